"""Where a Serve replica's ranks run: the layout of its placement group, decided here only.

Bundle 0 holds the replica itself (the engine: scheduler, KV coordinator, no tensors); bundles
1.. hold one rank each, with one GPU per bundle on GPU nodes. Serve reserves the whole group
before it starts the replica, so ranks never wait for resources after the replica is up.
"""

from __future__ import annotations

from cluster.config import LongctxConfig

WORKER_BUNDLE_OFFSET = 1  # bundle 0 is the replica's own


def uses_gpu(config: LongctxConfig) -> bool:
    device = config.model.device
    if device != "auto":
        return device.startswith("cuda")
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def placement_group_bundles(config: LongctxConfig, replica_num_cpus: float = 1.0) -> list[dict[str, float]]:
    """Bundle 0 for the replica, then one bundle per rank (a GPU each on GPU nodes)."""
    worker: dict[str, float] = {"CPU": config.serve.worker_num_cpus}
    if uses_gpu(config):
        worker["GPU"] = 1.0
    return [{"CPU": replica_num_cpus}] + [dict(worker) for _ in range(config.parallel.world_size)]
