"""`longctx serve`: deploy the Serve application and stay in the foreground until Ctrl-C/SIGTERM.

Without RAY_ADDRESS (Ray's own variable) an embedded Ray starts on this machine, with no fixed
ports besides the HTTP one, so two instances on one node only need two --port values. With
RAY_ADDRESS the application goes to that cluster and is deleted from it on exit (to leave it
running there, use `serve deploy deployments/serve_config.yaml`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading

from cluster.config import LongctxConfig

APP_NAME = "longctx"


def serve_foreground(config: LongctxConfig, host: str, port: int) -> int:
    import ray
    from ray import serve

    from deployments.ingress import served_model_name
    from deployments.prompts import PromptBuilder

    # Fail fast and plainly on a bad model folder, before Ray starts and Serve retries replicas.
    PromptBuilder.from_config(config)
    embedded = "RAY_ADDRESS" not in os.environ
    _start_ray(config, embedded)
    try:
        deploy(config, host, port)
        print(f"longctx: serving {served_model_name(config)!r} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
        _wait_for_signal()
    except RuntimeError as error:  # a deployment that failed to start: the replica's error is in it
        print(f"longctx: error: {error}", file=sys.stderr)
        return 1
    finally:
        _stop(serve, ray, embedded)
    return 0


def deploy(config: LongctxConfig, host: str, port: int, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """Start Serve's HTTP proxy on host:port and run the application; returns once its replicas
    (and their model workers, one per TP x SP rank) are up. On a Ray where Serve already runs,
    the running proxy is kept (its host and port win) and the application joins it under
    `route_prefix`: several applications can share one Ray."""
    from ray import serve

    from deployments.app import build_application

    # No proxy-wide timeout: serve.request_timeout_s bounds each request, a long prefill included.
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": None})
    serve.run(build_application(config), name=name, route_prefix=route_prefix)


def _start_ray(config: LongctxConfig, embedded: bool) -> None:
    import ray

    if not embedded:
        ray.init()  # RAY_ADDRESS
        return
    # Logical CPUs are scheduling slots, not threads: reserve enough for every bundle even on a
    # machine with fewer cores, or the placement groups would wait for ever.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, _cpus_needed(config)), include_dashboard=False)


def _cpus_needed(config: LongctxConfig) -> int:
    settings = config.serve
    per_replica = 1.0 + settings.worker_num_cpus * config.parallel.world_size
    return math.ceil(settings.ingress_replicas * settings.ingress_num_cpus + config.max_llm_replicas * per_replica)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass


def _stop(serve, ray, embedded: bool) -> None:
    """Requests in flight finish first (up to serve.drain_timeout_s), then everything stops.

    Deleting the application drains its replicas while the HTTP proxy is still up to carry their
    streams; serve.shutdown() alone would take the proxy down with them.
    """
    print("longctx: draining requests in flight, then shutting down", flush=True)
    serve.delete(APP_NAME)
    if embedded:
        serve.shutdown()
        ray.shutdown()
