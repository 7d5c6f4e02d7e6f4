"""`longctx serve`: deploy the Serve application and stay in the foreground until Ctrl-C/SIGTERM.

Without RAY_ADDRESS (Ray's own variable) an embedded Ray starts on this machine, with no fixed
ports besides the HTTP one, so two instances on one node only need two --port values. With
RAY_ADDRESS the application goes to that cluster and is deleted from it on exit (to leave it
running there, use `serve deploy deployments/serve_config.yaml`).
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import sys
import threading

from cluster.config import LongctxConfig

APP_NAME = "longctx"


def serve_foreground(config: LongctxConfig, host: str, port: int) -> int:
    import ray
    from ray import serve

    from deployments.ingress import served_model_name
    from deployments.prompts import PromptBuilder
    from model_folder.weight_files import sharded_weight_map

    # Fail fast and plainly on a bad model folder or a busy port, before Ray starts and Serve
    # retries replicas.
    PromptBuilder.from_config(config)
    sharded_weight_map(config.model.path)
    embedded = "RAY_ADDRESS" not in os.environ
    if embedded:
        check_port_free(host, port)
    proxy_port = _proxy_port(config, embedded, host, port)
    _start_ray(config, embedded)
    try:
        deploy(config, host, proxy_port)
        for line in _replica_summary(config):
            print(f"longctx: {line}", flush=True)
        print(f"longctx: serving {served_model_name(config)!r} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
        _wait_for_signal()
    except RuntimeError as error:  # a deployment that failed to start: the replica's error is in it
        print(f"longctx: error: the model server did not start: {_failure_cause(error)}", file=sys.stderr)
        print(f"longctx: full logs under {_log_dir()}", file=sys.stderr)
        return 1
    finally:
        _stop(serve, ray, embedded)
    return 0


def check_port_free(host: str, port: int) -> None:
    """Raise OSError naming the port when something listens there already. Ray's HTTP proxy
    binds with SO_REUSEPORT, so a second server would share the port and split the requests."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(f"port {port} on {host} is in use ({error.strerror}): is another server running? "
                          "Stop it or pass another --port") from None


def _proxy_port(config: LongctxConfig, embedded: bool, host: str, port: int) -> int:
    """The port Serve's proxy takes: the HTTP port itself, or, with direct ingress (an embedded
    Ray whose one LLM server replica serves the API: serve.direct_ingress), a free one while that
    replica listens on `port`. Sets Ray's environment for it: call before Ray starts."""
    if not (embedded and config.serve.direct_ingress and config.serves_http_from_llm_server):
        return port
    from deployments.app import direct_ingress_env

    os.environ.update(direct_ingress_env(port))
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _replica_summary(config: LongctxConfig) -> list[str]:
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", APP_NAME)
    lines = handle.summary_lines.remote().result(timeout_s=30)
    replicas = config.serve.num_replicas
    return [*lines, f"{replicas} replica{'s' if replicas > 1 else ''} of that; logs under {_log_dir()}"]


def _failure_cause(error: RuntimeError) -> str:
    """The replica's own exception, one line, out of Serve's status (its traceback is there)."""
    from ray import serve

    try:
        message = serve.status().applications[APP_NAME].deployments["LLMServer"].message
    except Exception:  # noqa: BLE001 - no status to read: Serve's own error is all there is
        message = str(error)
    return _exception_line(message) or str(error).splitlines()[0]


def _exception_line(text: str) -> str | None:
    """The last `SomeError: why` line of a traceback."""
    matches = re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    if not matches:
        return None
    name, why = matches[-1]
    return f"{name.rsplit('.', 1)[-1]}: {why}"


def _log_dir() -> str:
    import ray

    try:
        context = ray.get_runtime_context()
        return os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")
    except Exception:  # noqa: BLE001 - Ray not up (a failure before it started): its default place
        return "/tmp/ray/session_latest/logs"


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
    # The replicas' logs (their tracebacks on every retry among them) stay in Ray's log files;
    # this terminal gets longctx's own lines: the summary, or the one cause of a failure.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, _cpus_needed(config)), include_dashboard=False,
             log_to_driver=False)


def _cpus_needed(config: LongctxConfig) -> int:
    from deployments.app import application_needs

    return math.ceil(application_needs(config).get("CPU", 0))


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
