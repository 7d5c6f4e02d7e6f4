"""longctx's one-replica application with Serve's direct ingress, on a Ray of its own process.

Run as a script with a model folder: it picks two free ports, starts a local Ray with
`deployments.app.direct_ingress_env(port)` in its environment (the controller and the replicas
read it at start), runs the application, prints `ready <replica port> <proxy port>` once it is
up, and stops Serve and that Ray when stdin closes. A process of its own because the test
session's Ray was started without that environment.
"""

from __future__ import annotations

import os
import socket
import sys


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(model_dir: str) -> None:
    import ray
    from ray import serve

    from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings, ServeSettings
    from deployments.app import build_application, direct_ingress_env

    config = LongctxConfig(
        model=ModelSettings(path=model_dir),
        cache=CacheSettings(block_size=16, num_device_blocks=512),
        scheduler=SchedulerSettings(max_tokens_per_step=512),
        serve=ServeSettings(routing_block_tokens=16),
    )
    port, proxy_port = _free_port(), _free_port()
    os.environ.update(direct_ingress_env(port))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        serve.run(build_application(config), name="direct", route_prefix="/")
        print("ready", port, proxy_port, flush=True)
        sys.stdin.read()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
