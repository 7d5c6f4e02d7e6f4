"""Where a Serve replica's ranks run: the layout of its placement group, decided here only.

Bundle 0 holds the replica itself (the engine: scheduler, KV coordinator, no tensors); the
bundles after it hold the ranks. Serve reserves the whole group before it starts the replica, so
ranks never wait for resources after the replica is up. Two layouts (`parallel.span_nodes`):

  one node (default)   one bundle per rank, STRICT_PACK: every rank on the replica's node.
  TP in a node,        one bundle per SP rank holding its whole TP group (tp GPUs), PACK: a
  SP across nodes      bundle never splits across nodes, so each TP group's all-reduces stay on
                       NVLink, while the SP ring (one KV pass per chunk, hidden behind
                       attention) may cross the network to the next node.

World rank r is (sp_rank, tp_rank) = divmod(r, tp) (model_shards/parallel/groups.py), so a TP
group is tp consecutive ranks: rank r sits in bundle `rank_bundle_index(config, r)`.
"""

from __future__ import annotations

from cluster.config import LongctxConfig

REPLICA_BUNDLE = 0
ACCELERATOR_TYPE_SHARE = 0.001


def uses_gpu(config: LongctxConfig) -> bool:
    device = config.model.device
    if device != "auto":
        return device.startswith("cuda")
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def rank_resources(config: LongctxConfig) -> dict[str, float]:
    """What one rank's actor asks for: a GPU on GPU nodes, of the configured GPU model if any."""
    resources: dict[str, float] = {"CPU": config.serve.worker_num_cpus}
    if uses_gpu(config):
        resources["GPU"] = 1.0
        if config.serve.accelerator_type:  # Ray's convention: a sliver of the node's type resource
            resources[f"accelerator_type:{config.serve.accelerator_type}"] = ACCELERATOR_TYPE_SHARE
    return resources


def placement_group_bundles(config: LongctxConfig, replica_num_cpus: float = 1.0) -> list[dict[str, float]]:
    """Bundle 0 for the replica, then one bundle per rank, or per TP group when spanning nodes."""
    parallel, rank = config.parallel, rank_resources(config)
    if not parallel.span_nodes:
        return [{"CPU": replica_num_cpus}] + [dict(rank) for _ in range(parallel.world_size)]
    group = {name: amount * parallel.tensor_parallel_size for name, amount in rank.items()}
    return [{"CPU": replica_num_cpus}] + [dict(group) for _ in range(parallel.sequence_parallel_size)]


def placement_strategy(config: LongctxConfig) -> str:
    return "PACK" if config.parallel.span_nodes else "STRICT_PACK"


def rank_bundle_index(config: LongctxConfig, rank: int) -> int:
    if config.parallel.span_nodes:
        return REPLICA_BUNDLE + 1 + rank // config.parallel.tensor_parallel_size
    return REPLICA_BUNDLE + 1 + rank
