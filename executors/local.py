"""The local backend: one rank in this process, or one spawned local process per TP x SP rank."""

from __future__ import annotations

from typing import Callable

from cluster.config import ConfigError, LongctxConfig
from executors.base import Executor
from executors.rank_processes import RankProcesses
from protocol.step import StepInput, StepOutput


def create_local_executor(config: LongctxConfig) -> Executor:
    if config.parallel.span_nodes:
        raise ConfigError("parallel.span_nodes places ranks on other nodes: it needs parallel.executor ray "
                          "(the default inside `longctx serve`)")
    if config.parallel.world_size == 1:
        return InProcessExecutor(config)
    return LocalProcessExecutor(config)


class InProcessExecutor(Executor):
    """One rank, in this process: the CPU default and the single-GPU path (no step round trip)."""

    def __init__(self, config: LongctxConfig):
        from model_shards.rank import (  # torch only where a worker runs
            single_rank_context,
            start_worker,
        )

        self._context = single_rank_context()
        self.description = start_worker(self._context, config)

    @property
    def worker(self):
        """The ModelWorker itself (tests and benches reach into it)."""
        return self._context.state["worker"]

    def execute(self, step_input: StepInput) -> StepOutput:
        return self.worker.execute(step_input)

    def execute_overlapping(self, step_input: StepInput, while_running: Callable[[], None]) -> StepOutput:
        return self.worker.execute(step_input, while_running)  # called at the worker's first wait

    def warm_up_stepping_thread(self) -> None:
        self.worker.warm_up_stepping_thread()

    def shutdown(self) -> None:
        from model_shards.rank import stop_worker

        stop_worker(self._context)


class LocalProcessExecutor(Executor):
    """tensor_parallel_size x sequence_parallel_size ranks on this node, one process each.

    `processes`: run on an existing world of the right size (tests reuse one across engines);
    the executor then leaves those processes running at shutdown."""

    def __init__(self, config: LongctxConfig, processes: RankProcesses | None = None):
        from model_shards.rank import execute_step, start_worker, stop_worker

        self._execute_step, self._stop_worker = execute_step, stop_worker
        self._owns_processes = processes is None
        self.processes = processes or RankProcesses(config.parallel.world_size, config.model.device)
        if self.processes.world_size != config.parallel.world_size:
            raise ValueError(f"{self.processes.world_size} processes for a world of {config.parallel.world_size}")
        try:
            self.description = self.processes.call(start_worker, config)[0]
        except BaseException:
            self.shutdown()
            raise

    def execute(self, step_input: StepInput) -> StepOutput:
        return self.processes.call_first(self._execute_step, step_input)

    def execute_overlapping(self, step_input: StepInput, while_running: Callable[[], None]) -> StepOutput:
        return self.processes.call_first(self._execute_step, step_input, while_waiting=while_running)

    def shutdown(self) -> None:
        if self._owns_processes:
            self.processes.shutdown()
        else:
            self.processes.call(self._stop_worker)
