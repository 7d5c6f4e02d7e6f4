"""Executors run a step on the model workers. One interface, several ways to host the workers.

The scheduler and block manager stay in the driver; an executor only ships a `StepInput` to its
workers and brings back the `StepOutput` of rank 0. In-process (one rank) lives here; the
multiprocess and Ray-actor executors (tensor / sequence parallelism) register beside it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

from cluster.config import LongctxConfig
from engine.step import StepInput, StepOutput


class Executor(ABC):
    @property
    @abstractmethod
    def num_kv_blocks(self) -> int:
        """KV blocks every rank holds (the smallest over ranks)."""

    @property
    @abstractmethod
    def kv_layout(self) -> str:
        """A string naming dtype, block size and parallel layout, for prefix-hash fingerprints."""

    @property
    def kv_block_nbytes(self) -> int:
        """Bytes of one KV block on every rank: sizes the host tier in blocks."""
        raise NotImplementedError

    @abstractmethod
    def execute(self, step_input: StepInput) -> StepOutput: ...

    def shutdown(self) -> None:
        """Release workers and their memory."""


class DescribedExecutor(Executor):
    """An executor whose ranks report their KV facts once at start, in `self.description`
    (any object with num_kv_blocks, kv_layout and kv_block_nbytes: rank 0's, the world's minimum)."""

    description: Any

    @property
    def num_kv_blocks(self) -> int:
        return self.description.num_kv_blocks

    @property
    def kv_layout(self) -> str:
        return self.description.kv_layout

    @property
    def kv_block_nbytes(self) -> int:
        return self.description.kv_block_nbytes


class InProcessExecutor(Executor):
    """One rank, in this process: the CPU default and the single-GPU path."""

    def __init__(self, config: LongctxConfig):
        from model_shards.worker import ModelWorker  # torch is imported only where a worker runs

        self.worker = ModelWorker(config)

    @property
    def num_kv_blocks(self) -> int:
        return self.worker.num_kv_blocks

    @property
    def kv_layout(self) -> str:
        return self.worker.kv_layout

    @property
    def kv_block_nbytes(self) -> int:
        return self.worker.kv_block_nbytes

    def execute(self, step_input: StepInput) -> StepOutput:
        return self.worker.execute(step_input)

    def shutdown(self) -> None:
        self.worker.close()


def _ray_actor_executor(config: LongctxConfig) -> Executor:
    """Ray actors in the replica's placement group: one worker, or one per TP x SP rank."""
    if config.parallel.world_size > 1:
        from engine.ray_parallel_executor import RayParallelExecutor  # ray is imported only where it is used

        return RayParallelExecutor(config)
    from engine.ray_executor import RayActorExecutor

    return RayActorExecutor(config)


def _multiprocess_executor(config: LongctxConfig) -> Executor:
    from engine.multiproc_executor import MultiprocessExecutor

    return MultiprocessExecutor(config)


def create_executor(config: LongctxConfig) -> Executor:
    """One rank: in this process; tensor / sequence parallel ranks: one local process each."""
    if config.parallel.world_size > 1:
        return _multiprocess_executor(config)
    return InProcessExecutor(config)


# serve.executor -> executor. `in_process` keeps the model inside the replica, as create_executor
# does: with TP x SP ranks, local processes beside it (InProcessExecutor alone would run one rank
# and silently ignore the parallel config).
EXECUTORS: dict[str, Callable[[LongctxConfig], Executor]] = {
    "in_process": create_executor,
    "multiprocess": _multiprocess_executor,
    "ray": _ray_actor_executor,
}
