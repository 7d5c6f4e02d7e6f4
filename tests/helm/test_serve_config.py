"""The serveConfigV2 the chart renders is what `longctx serve` deploys: Ray Serve's deploy schema
accepts it, longctx's own config loader accepts its args (unknown keys rejected there), its
deployment overrides name real deployments, autoscaling reaches the LLM server deployment Serve
would run with the policy asked for, and the GPU worker pods can hold every replica's
placement-group bundles."""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

import pytest
from chart_helpers import SCENARIOS, one, render, serve_config
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.application_state import override_deployment_info
from ray.serve._private.build_app import build_app
from ray.serve._private.config import DeploymentConfig, ReplicaConfig
from ray.serve._private.deployment_info import DeploymentInfo
from ray.serve.schema import ServeDeploySchema

from autoscaler.serve_policy import QueuedContextPolicy
from cluster.serve import APP_NAME
from deployments.app import config_from_args, ingress_options, llm_server_options
from executors.placement import placement_group_bundles


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_validates_and_loads_as_the_longctx_config(scenario):
    document = serve_config(render(SCENARIOS[scenario]))
    ServeDeploySchema.model_validate(document)
    (application,) = document["applications"]
    assert (application["name"], application["import_path"], application["route_prefix"]) == (
        APP_NAME, "deployments.app:build_app", "/")
    config = config_from_args(application["args"])
    assert config.model.device == "cuda"  # the head builds the app without seeing a GPU
    assert document["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": None}


def test_values_reach_the_config():
    values = {"model": {"name": "llama", "dtype": "bfloat16", "maxModelLen": 1048576},
              "parallel": {"tensorParallelSize": 4, "sequenceParallelSize": 2}, "workers": {"gpusPerPod": 8},
              "cache": {"blockSize": 128}, "scheduler": {"maxTokensPerStep": 8192},
              "serve": {"numReplicas": 3, "requestTimeoutS": 7200}, "router": {"blockTokens": 512, "longPromptTokens": 65536, "shortLanes": 2},
              "kvTiers": {"hostBytes": 17179869184, "restorePolicy": "always"},
              "extraConfig": {"serve": {"stall_timeout_s": 900}}}
    config = config_from_args(serve_config(render(values))["applications"][0]["args"])
    assert config.serve.model_name == "llama"
    assert (config.model.dtype, config.model.max_model_len, config.model.path) == ("bfloat16", 1048576, "/models/model")
    assert (config.parallel.tensor_parallel_size, config.parallel.sequence_parallel_size) == (4, 2)
    assert (config.cache.block_size, config.scheduler.max_tokens_per_step) == (128, 8192)
    assert (config.serve.num_replicas, config.serve.request_timeout_s, config.serve.routing_block_tokens) == (3, 7200, 512)
    assert (config.serve.routing_long_prompt_tokens, config.serve.routing_short_lanes) == (65536, 2)
    assert (config.kv_tiers.host_bytes, config.kv_tiers.restore_policy) == (17179869184, "always")
    assert config.serve.stall_timeout_s == 900  # extraConfig, merged over the rest
    assert config.kv_tiers.redis_urls == ("redis://demo-longctx-redis:6379/0",)
    assert config.kv_tiers.redis_password_file == "/etc/longctx/redis-password/redis-password"


def test_no_secret_is_written_into_the_rayservice():
    objects = render(SCENARIOS["object store, autoscaling, ingress, API key"])
    config = config_from_args(serve_config(objects)["applications"][0]["args"])
    assert config.serve.api_key is None and config.serve.api_key_file == "/etc/longctx/api-key/api-key"
    assert all("@" not in url for url in config.kv_tiers.redis_urls)
    worker = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    mounts = {mount["mountPath"] for mount in worker["containers"][0]["volumeMounts"]}
    assert {"/etc/longctx/api-key", "/etc/longctx/redis-password", "/etc/longctx/redis-tls"} <= mounts


def deployed_llm_server(document: dict[str, Any]) -> DeploymentConfig:
    """The LLM server's options as Serve's controller ends up with them for this serveConfigV2:
    the application built from its import path and args, the options through the proto bytes the
    build task sends, then the document's deployment overrides merged by Serve's own code (private,
    but a copy of its rules here could agree with the chart and both be wrong)."""
    (application,) = ServeDeploySchema.model_validate(document).applications
    # As on the chart's head, whose cluster KubeRay grows (RAY_ADDRESS set): the one-node size check
    # of deployments/app.py must not read a Ray that an earlier test of the session left running.
    with mock.patch.dict(os.environ, {"RAY_ADDRESS": "auto"}):
        app = call_user_app_builder_with_args_if_necessary(import_attr(application.import_path), application.args)
    infos = {deployment.name: DeploymentInfo(
        deployment_config=DeploymentConfig.from_proto_bytes(deployment._deployment_config.to_proto_bytes()),
        replica_config=ReplicaConfig.from_proto_bytes(deployment._replica_config.to_proto_bytes(),
                                                      deployment._deployment_config.needs_pickle()),
        start_time_ms=0, deployer_job_id="") for deployment in build_app(app, name=application.name).deployments}
    return override_deployment_info(infos, application)["LLMServer"].deployment_config


def test_autoscaling_is_the_queued_context_policy_by_default():
    values = {"serve": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 6, "queuedContext": {
        "ttftTargetS": 60, "spareReplicas": 1, "replicaStartupS": 90, "downscaleDelayS": 300}}},
        "extraConfig": {"autoscaling": {"interactive_ttft_s": 5}}}
    objects = render(values)
    document = serve_config(objects)
    assert "deployments" not in document["applications"][0]  # an override would replace the policy
    config = config_from_args(document["applications"][0]["args"]).autoscaling
    assert (config.enabled, config.min_replicas, config.max_replicas) == (True, 1, 6)
    assert (config.ttft_target_s, config.spare_replicas, config.replica_startup_s, config.downscale_delay_s) == (
        60, 1, 90, 300)
    assert config.interactive_ttft_s == 5  # extraConfig reaches the other settings

    deployed = deployed_llm_server(document)
    assert "num_replicas" not in deployed.user_configured_option_names  # no fixed count beside the policy
    scaling = deployed.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 6)
    assert scaling.policy.policy_function == f"{QueuedContextPolicy.__module__}.{QueuedContextPolicy.__name__}"
    controller_policy = scaling.policy.get_policy()(**scaling.policy.policy_kwargs)  # as Serve's controller builds it
    assert controller_policy.settings == config

    group = one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 6)


def custom_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """A user's own Serve policy, for the chart's module:function form (conftest.py puts
    tests/helm on sys.path, so this module imports by name)."""
    return 1, {}


@pytest.mark.parametrize(("policy", "deployed_policy"), [
    ("ongoingRequests", "ray.serve.autoscaling_policy:default_autoscaling_policy"),
    ("test_serve_config:custom_policy", "test_serve_config:custom_policy"),
])
def test_serve_policies_are_a_deployment_override(policy, deployed_policy):
    values = {"serve": {"autoscaling": {"enabled": True, "policy": policy, "maxReplicas": 3,
                                        "ongoingRequests": {"targetOngoingRequests": 32, "downscaleDelayS": 900}}}}
    document = serve_config(render(values))
    config = config_from_args(document["applications"][0]["args"])
    assert config.autoscaling.enabled is False
    assert config.max_llm_replicas == 3  # the ingress and the resource check allow for the most replicas
    (overrides,) = document["applications"][0]["deployments"]
    assert (overrides["num_replicas"], overrides["autoscaling_config"]["target_ongoing_requests"]) == ("auto", 32)

    scaling = deployed_llm_server(document).autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 3)
    assert (scaling.target_ongoing_requests, scaling.downscale_delay_s) == (32, 900)
    assert scaling.policy.policy_function == deployed_policy


def test_a_replica_over_two_nodes_keeps_tp_in_a_node_and_packs_sp_over_nodes():
    document = serve_config(render(SCENARIOS["TP x SP over 2 nodes"]))
    assert "deployments" not in document["applications"][0]  # the code's own placement, no override
    config = config_from_args(document["applications"][0]["args"])
    assert config.parallel.span_nodes is True
    assert llm_server_options(config)["placement_group_strategy"] == "PACK"
    assert config_from_args(serve_config(render())["applications"][0]["args"]).parallel.span_nodes is False


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpu_worker_pods_hold_every_replica_bundle(scenario):
    """The bundles longctx asks for (executors/placement.py) fit the pods the chart asks for, with
    no GPU left idle: first-fit over one replica's pods, the ingress replicas included."""
    objects = render(SCENARIOS[scenario])
    config = config_from_args(serve_config(objects)["applications"][0]["args"])
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no bundle can land on the head
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    nodes = group["maxReplicas"] // config.max_llm_replicas
    pods = [{"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"]), **{
        name: float(amount) for name, amount in group.get("resources", {}).items()}} for _ in range(nodes)]
    bundles = placement_group_bundles(config)
    assert llm_server_options(config)["placement_group_bundles"] == bundles
    ingress = {"CPU": ingress_options(config)["ray_actor_options"]["num_cpus"]}
    for bundle in sorted(bundles, key=lambda b: -b.get("GPU", 0)) + [ingress] * config.serve.ingress_replicas:
        pod = next((pod for pod in pods if all(pod.get(name, 0) >= amount for name, amount in bundle.items())), None)
        assert pod is not None, f"{bundle} fits no pod of {pods}"
        for name, amount in bundle.items():
            pod[name] -= amount
    assert all(pod["GPU"] == 0 for pod in pods)
