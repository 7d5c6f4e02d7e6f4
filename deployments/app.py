"""The Serve application: OpenAIIngress -> LLMServer (or, with one LLM server replica, the
LLMServer serving HTTP itself: deployments/server_ingress.py), with the Serve options longctx needs.

`build_app` is the import path for `serve run` / `serve deploy` / KubeRay's serveConfigV2:

    import_path: deployments.app:build_app
    args: {config: <mapping or YAML path>, overrides: {"serve.num_replicas": 2}}

`build_application(config)` is what `longctx serve` calls with its own config.
"""

from __future__ import annotations

import math
import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from autoscaler.serve_policy import QueuedContextPolicy
from cluster.config import AutoscalingSettings, ConfigError, LongctxConfig, load_config, load_config_dict
from deployments.ingress import OpenAIIngress
from deployments.llm_server import LLMServer
from deployments.server_ingress import LLMServerWithAPI
from executors import executor_backend
from executors.placement import placement_group_bundles, placement_strategy, uses_gpu

REPLICA_NUM_CPUS = 1.0  # the engine's own thread: scheduling, block tables, detokenizing
# A stopping replica checks for requests in flight this often until none is left (or
# drain_timeout_s passes). Serve's default (2 s) sleeps before its first check: every idle
# replica that stops (scale-in, redeploy, delete, shutdown) waited 2 s for nothing.
DRAIN_POLL_S = 0.2

# By default Serve runs user code on a second event loop thread and the handle's router on a
# third, so every streamed token crosses threads several times in each process. One loop per
# process gave ~1.5x the tokens/s through the stack at 16 streams on the CPU machine
# (bench/serve_load.py). Our request path never blocks its loop: the engine steps on its own
# thread, long prompts are tokenized on another, the sync hooks run in Serve's thread pool.
SERVE_ENV_VARS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray processes' environment for Serve's direct ingress, set before Ray starts (the
    controller and the replicas read it at import): the ingress replica serves HTTP on `port`
    itself, so a request and its streamed chunks skip the proxy, the Ray call to the replica and
    the replica's call back to the proxy for the body (session 6: 8.4 -> 1.5 ms a trivial GET on
    the CPU machine). For one replica serving the API itself (`serves_http_from_llm_server`);
    Serve's proxy still runs, on its own port, for every other route."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # The range the controller hands replicas their ports from (end exclusive): this port.
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        # Serve holds a stopping replica open 30 s for a cloud load balancer to deregister it;
        # nothing deregisters here, and requests in flight still finish (drain_timeout_s).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def build_app(args: dict[str, Any]) -> Application:
    config = config_from_args(args)
    check_cluster_fits(config)
    return build_application(config)


def application_needs(config: LongctxConfig) -> dict[str, float]:
    """Logical resources the whole application reserves: ingress replicas (unless the LLM server
    serves HTTP itself), LLM server replicas and (Ray executor) their ranks' bundles."""
    needs: dict[str, float] = {}
    if not config.serves_http_from_llm_server:
        ingress = ingress_options(config)
        _add(needs, ingress["ray_actor_options"], ingress["num_replicas"])
    server = llm_server_options(config)
    for bundle in server.get("placement_group_bundles") or [server["ray_actor_options"]]:
        _add(needs, bundle, config.max_llm_replicas)  # autoscaling: room for its most replicas
    return needs


def _add(needs: dict[str, float], resources: dict[str, Any], times: int) -> None:
    for name, key in (("CPU", "num_cpus"), ("GPU", "num_gpus"), ("CPU", "CPU"), ("GPU", "GPU")):
        amount = resources.get(key) or 0
        if amount:
            needs[name] = needs.get(name, 0.0) + amount * times


def check_cluster_fits(config: LongctxConfig, resources: dict[str, float] | None = None,
                       num_nodes: int | None = None) -> None:  # fmt: skip
    """On a one-node Ray that nothing will grow (RAY_ADDRESS unset: `serve run` started it, or a
    local `ray start`), an application larger than the node would wait for ever: refuse it now."""
    import ray

    if config.serve.cluster_grows:
        return
    if resources is None:
        if not ray.is_initialized() or "RAY_ADDRESS" in os.environ or len(ray.nodes()) != 1:
            return
        resources, num_nodes = ray.cluster_resources(), 1
    if num_nodes != 1:
        return
    needs = application_needs(config)
    short = [f"{amount:g} {name}s (it has {resources.get(name, 0):g})" for name, amount in needs.items()
             if amount > resources.get(name, 0) + 1e-9]  # fmt: skip
    if short:
        raise ConfigError(
            f"this one-node Ray cannot hold the application, which needs {' and '.join(short)}; it would wait "
            "for ever. Run `longctx serve --config FILE` (it sizes its own Ray), or start Ray with more logical "
            f"CPUs (`ray start --head --num-cpus {math.ceil(needs.get('CPU', 0))}`) before `serve run`, or lower "
            "serve.num_replicas / serve.worker_num_cpus / serve.ingress_num_cpus, or set parallel.executor: local "
            "(a cluster that adds nodes on demand: set serve.cluster_grows: true)")


def config_from_args(args: dict[str, Any]) -> LongctxConfig:
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"unknown application args {sorted(unknown)}; expected 'config' and 'overrides'")
    source = args.get("config")
    config = load_config_dict(source) if isinstance(source, dict) else load_config(source)
    config = config.with_overrides(args.get("overrides") or {})
    if not config.model.path:
        raise ConfigError("no model: set model.path in the application's config")
    return config


def build_application(config: LongctxConfig) -> Application:
    config_data = config.model_dump()
    if config.serves_http_from_llm_server:  # one replica: the proxy streams straight from it
        server = serve.deployment(LLMServerWithAPI, name="LLMServer").options(**llm_server_options(config))
        return server.bind(config_data, own_process=True)
    llm_server = serve.deployment(LLMServer, name="LLMServer").options(**llm_server_options(config))
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress").options(**ingress_options(config))
    return ingress.bind(llm_server.bind(config_data, own_process=True), config_data)


def llm_server_options(config: LongctxConfig) -> dict[str, Any]:
    settings = config.serve
    return {
        **_replica_count(config),
        # Serve's default (5) would starve continuous batching. A replica takes a full batch plus
        # its admission queue; past that its own queue answers 429 with the token-aware bound.
        "max_ongoing_requests": config.scheduler.max_num_seqs + settings.max_queued_requests,
        # When every replica is at that bound, a caller queues at most this many before 429
        # (Serve's default is unbounded: requests would wait there past their deadline).
        "max_queued_requests": settings.max_queued_requests,
        **_placement(config),
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": settings.health_check_timeout_s,
        # A model that fails to load fails the same way again; Serve's default of 20 attempts
        # would hide the error behind many minutes of retries.
        "max_constructor_retry_count": 2,
        # Serve's default (20 s) would cut off a long generation in flight on every redeploy.
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        "request_router_config": RequestRouterConfig(
            request_router_class="deployments.router.PrefixAwareRequestRouter",
            request_router_kwargs={
                "chunk_tokens": settings.routing_block_tokens,
                "max_entries": settings.routing_max_tracked_blocks,
                "long_prompt_tokens": settings.routing_long_prompt_tokens,
                "short_lanes": settings.routing_short_lanes,
            },
            request_routing_stats_period_s=settings.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 5 * settings.routing_stats_period_s),
        ),
    }


def _replica_count(config: LongctxConfig) -> dict[str, Any]:
    if not config.autoscaling.enabled:
        return {"num_replicas": config.serve.num_replicas}
    return {"autoscaling_config": autoscaling_config(config.autoscaling)}


def autoscaling_config(settings: AutoscalingSettings) -> AutoscalingConfig:
    """Serve's autoscaler driving the queued-context policy (autoscaler/serve_policy.py)."""
    return AutoscalingConfig(
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        initial_replicas=settings.initial_replicas,
        # Deprecated in Ray 2.60 but still what the replicas push on (the env vars that replace
        # it, RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S, are read nowhere yet).
        metrics_interval_s=settings.metrics_push_interval_s,
        # Replicas sample their stats every 0.2 x look_back: one sample per push.
        look_back_period_s=5 * settings.metrics_push_interval_s,
        # The policy has its own delays; Serve's would hold back scale-ups as well.
        upscale_delay_s=0.0,
        downscale_delay_s=0.0,
        policy=AutoscalingPolicy(policy_function=QueuedContextPolicy, policy_kwargs=settings.model_dump(mode="json")),
    )


def _placement(config: LongctxConfig) -> dict[str, Any]:
    if executor_backend(config, inside_ray_actor=True) != "ray":
        # The ranks run inside the replica (its process, or one local process each under TP x
        # SP): the replica reserves what all of them use.
        world_size = config.parallel.world_size
        gpus = world_size if uses_gpu(config) else 0
        options = _actor_options(config.serve.worker_num_cpus * world_size, num_gpus=gpus)
        if gpus and config.serve.accelerator_type:
            options["accelerator_type"] = config.serve.accelerator_type
        return {"ray_actor_options": options}
    return {
        "ray_actor_options": _actor_options(REPLICA_NUM_CPUS),
        "placement_group_bundles": placement_group_bundles(config, REPLICA_NUM_CPUS),
        # One node per replica unless SP may cross nodes: every step is a round trip between the
        # engine and its ranks, and TP's all-reduces must stay on NVLink.
        "placement_group_strategy": placement_strategy(config),
    }


def ingress_options(config: LongctxConfig) -> dict[str, Any]:
    settings = config.serve
    per_replica = config.scheduler.max_num_seqs + settings.max_queued_requests
    return {
        "num_replicas": settings.ingress_replicas,
        # An ongoing request is a coroutine waiting on an LLM server; the servers' admission
        # queues are the real bound, so the ingress must not become a tighter one.
        "max_ongoing_requests": max(1, per_replica * config.max_llm_replicas // settings.ingress_replicas),
        "ray_actor_options": _actor_options(settings.ingress_num_cpus),
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,  # streams in flight finish first
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
    }


def _actor_options(num_cpus: float, num_gpus: float = 0) -> dict[str, Any]:
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": dict(SERVE_ENV_VARS)}}
