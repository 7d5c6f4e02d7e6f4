"""The executor interface: ship a step to the ranks, bring back rank 0's output."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from protocol.step import StepInput, StepOutput
from protocol.worker_description import WorkerDescription


class RankFailure(RuntimeError):
    """A rank raised or died; the message carries its traceback or exit code."""


class Executor(ABC):
    """Every backend learns its workers' `WorkerDescription` when they have started (weights and
    KV cache loaded: a replica is ready only then) and keeps it in `description`."""

    description: WorkerDescription

    @property
    def num_kv_blocks(self) -> int:
        """KV blocks every rank holds (the smallest over ranks)."""
        return self.description.num_kv_blocks

    @property
    def kv_layout(self) -> str:
        """dtype, block size and parallel layout: part of the KV fingerprint."""
        return self.description.kv_layout

    @property
    def kv_block_nbytes(self) -> int:
        """Bytes of one KV block on one rank: sizes the host tier in blocks."""
        return self.description.kv_block_nbytes

    @abstractmethod
    def execute(self, step_input: StepInput) -> StepOutput: ...

    def execute_overlapping(self, step_input: StepInput, while_running: Callable[[], None]) -> StepOutput:
        """`execute`, calling `while_running()` once while the step runs: after the step is sent
        (its kernels queued), before the wait for its output. `while_running` never raises
        (engine/overlapped_work.py). This default runs it after the step: no overlap."""
        step_output = self.execute(step_input)
        while_running()
        return step_output

    def warm_up_stepping_thread(self) -> None:
        """Prepare the calling thread to step (per-thread kernel plans) before its first request.
        Workers in processes of their own step on their own threads: nothing to do."""

    def shutdown(self) -> None:
        """Release the workers and their memory."""
