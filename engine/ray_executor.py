"""Model workers as Ray actors in the caller's placement group (a Serve replica's).

The layout of that group is decided here and only here (`placement_group_bundles`): bundle 0
holds the replica itself (the engine: scheduler, block manager, no tensors), bundles 1.. hold
one model worker each, with one GPU per bundle on GPU nodes. Serve reserves the whole group
before it starts the replica, so workers never wait for resources after the replica is up,
and tensor x sequence parallel ranks can later take bundles 1..world_size without any change
to the deployment.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import LongctxConfig
from engine.executor import Executor
from engine.step import StepInput, StepOutput

WORKER_BUNDLE_OFFSET = 1  # bundle 0 is the replica's own


def uses_gpu(config: LongctxConfig) -> bool:
    device = config.model.device
    if device != "auto":
        return device.startswith("cuda")
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


ACCELERATOR_TYPE_SHARE = 0.001


def placement_group_bundles(config: LongctxConfig, replica_num_cpus: float = 1.0) -> list[dict[str, float]]:
    """Bundle 0 for the replica, then one bundle per model worker (a GPU each on GPU nodes)."""
    worker: dict[str, float] = {"CPU": config.serve.worker_num_cpus}
    if uses_gpu(config):
        worker["GPU"] = 1.0
        if config.serve.accelerator_type:  # Ray's convention: a sliver of the node's type resource
            worker[f"accelerator_type:{config.serve.accelerator_type}"] = ACCELERATOR_TYPE_SHARE
    return [{"CPU": replica_num_cpus}] + [dict(worker) for _ in range(config.parallel.world_size)]


class WorkerActor:
    """A `ModelWorker` behind a Ray actor: remote calls cannot read properties, so `describe`."""

    def __init__(self, config: LongctxConfig):
        # torch is imported in the actor only
        from model_shards.worker import ModelWorker

        self.worker = ModelWorker(config)

    def describe(self) -> tuple[int, str, int]:
        return self.worker.num_kv_blocks, self.worker.kv_layout, self.worker.kv_block_nbytes

    def execute(self, step_input: StepInput) -> StepOutput:
        return self.worker.execute(step_input)


class RayActorExecutor(Executor):
    def __init__(self, config: LongctxConfig):
        if config.parallel.world_size > 1:
            # One actor per rank in bundles 1..world_size, joined by torch.distributed: the
            # parallelism work plugs in here.
            raise NotImplementedError("the Ray executor runs one worker; tensor / sequence parallelism is not wired yet")
        self._worker = _start_worker(config, rank=0)
        # Blocks until the weights and the KV cache are loaded: a replica is ready only then.
        self._num_kv_blocks, self._kv_layout, self._kv_block_nbytes = ray.get(self._worker.describe.remote())
        # A compiled graph saves ~0.75 ms a step but its worker busy-polls a core even when idle:
        # worth it beside a GPU, ruinous on a CPU-only node whose cores run the model itself.
        self._step = _compiled_step(self._worker) if uses_gpu(config) else None

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    @property
    def kv_layout(self) -> str:
        return self._kv_layout

    @property
    def kv_block_nbytes(self) -> int:
        return self._kv_block_nbytes

    def execute(self, step_input: StepInput) -> StepOutput:
        # No deadline here (the compiled graph's default is 10 s, less than a long prefill step on
        # a CPU): a step that hangs is the replica health check's to catch (serve.stall_timeout_s).
        if self._step is None:
            return ray.get(self._worker.execute.remote(step_input))
        return self._step.execute(step_input).get(timeout=-1)

    def shutdown(self) -> None:
        if self._step is not None:
            self._step.teardown()
        ray.kill(self._worker, no_restart=True)


def _compiled_step(worker: Any) -> Any:
    """The step as a Ray compiled graph over shared memory. One per engine step, so per output
    token: on the CPU machine it adds 0.45 ms a step where a plain actor call adds 1.2 ms. The
    price: the worker polls its input channel, one busy core per worker even when idle.
    Channels grow to fit a large message (a new 1M-token prompt), so no buffer size is set."""
    from ray.dag import InputNode

    with InputNode() as step_input:
        graph = worker.execute.bind(step_input)
    return graph.experimental_compile()


def _start_worker(config: LongctxConfig, rank: int) -> Any:
    options: dict[str, Any] = {"num_cpus": config.serve.worker_num_cpus, "num_gpus": 1 if uses_gpu(config) else 0}
    group = ray.util.get_current_placement_group()
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=WORKER_BUNDLE_OFFSET + rank
        )
    # A worker that dies takes its KV cache with it; restarting it under a live engine would
    # leave the block manager describing blocks that no longer exist. The replica fails its
    # health check instead and Serve replaces the pair.
    return ray.remote(WorkerActor).options(max_restarts=0, **options).remote(config)
