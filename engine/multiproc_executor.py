"""Model workers in local processes, one per rank, joined by torch.distributed.

The driver (this process: engine, scheduler, block manager) never imports torch. It pickles each
`StepInput` once and writes the same bytes to every rank's pipe; the ranks run the step in lock
step (their collectives pair them up) and only rank 0 answers, with the `StepOutput`. A rank that
fails sends its traceback instead, and a rank that dies is seen through its process sentinel, so
the driver raises `RankFailure` rather than waiting for ever.

Rendezvous: rank 0 opens torch.distributed's TCPStore on port 0 (the OS picks a free port, held
from then on, so two replicas on one node never race for one), reports it, and the driver hands it
to the other ranks. Backend: NCCL when the ranks run on GPUs (rank r on cuda:first+r), gloo on the
CPU. Processes are started with the `spawn` method: CUDA cannot run in a forked child.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from cluster.config import LongctxConfig
from engine.executor import DescribedExecutor
from engine.step import StepInput, StepOutput

_LOOPBACK = "127.0.0.1"


class RankFailure(RuntimeError):
    """A rank raised or died; the message carries its traceback or exit code."""


@dataclass
class RankContext:
    """What a function called on a rank is given: who it is, and state kept between calls."""

    rank: int
    world_size: int
    device: Any  # torch.device of this rank
    state: dict[str, Any] = field(default_factory=dict)


class RankProcesses:
    """`world_size` spawned processes in one torch.distributed world; the driver calls module-level
    functions `fn(context, *args)` on all of them."""

    def __init__(self, world_size: int, device: str = "cpu"):
        context = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self._connections: list[Connection] = []
        # Every reply names its call: after a call fails on one rank, the others' replies to it
        # may still arrive, and must not be taken for the next call's.
        self._call_id = 0
        self._processes = []
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(target=_rank_main, args=(rank, world_size, device, child),
                                      name=f"longctx-rank{rank}", daemon=True)
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)
        try:
            self._rendezvous()
        except BaseException:
            self.shutdown()
            raise

    def _rendezvous(self) -> None:
        port = self._collect({0})[0]
        for connection in self._connections[1:]:
            connection.send(port)
        self._collect(set(range(self.world_size)))  # each: "joined the process group"

    def call(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run fn on every rank; every rank's result, in rank order."""
        self._send_all(fn, args, reply_all=True)
        replies = self._collect(set(range(self.world_size)))
        return [replies[rank] for rank in range(self.world_size)]

    def call_first(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on every rank; rank 0's result (the others answer only if they fail)."""
        self._send_all(fn, args, reply_all=False)
        return self._collect({0})[0]

    def _send_all(self, fn: Callable[..., Any], args: tuple, reply_all: bool) -> None:
        if not self._connections:
            raise RankFailure("the rank processes are shut down")
        self._call_id += 1
        message = pickle.dumps((self._call_id, fn, args, reply_all), protocol=pickle.HIGHEST_PROTOCOL)  # once
        for connection in self._connections:
            connection.send_bytes(message)

    def _collect(self, expected: set[int]) -> dict[int, Any]:
        """The answers of the `expected` ranks, while watching every rank for a failure or an
        exit (a rank outside `expected` speaks only to report one)."""
        watched = {**{c: i for i, c in enumerate(self._connections)},
                   **{p.sentinel: i for i, p in enumerate(self._processes)}}
        replies: dict[int, Any] = {}
        while len(replies) < len(expected):
            for ready in sorted(wait(list(watched)), key=lambda r: not isinstance(r, Connection)):
                source = watched[ready]
                if not isinstance(ready, Connection):
                    raise RankFailure(f"rank {source} exited with code {self._processes[source].exitcode}")
                call_id, kind, payload = ready.recv()
                if call_id != self._call_id:
                    continue  # a late reply to a call that already failed on another rank
                if kind == "error":
                    raise RankFailure(f"rank {source} failed:\n{payload}")
                if source not in expected or source in replies:
                    raise RankFailure(f"rank {source} answered out of turn")
                replies[source] = payload
        return replies

    def shutdown(self) -> None:
        for connection in self._connections:
            try:
                connection.send_bytes(pickle.dumps(None))
            except OSError:  # already gone
                pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        for connection in self._connections:
            connection.close()
        self._connections, self._processes = [], []


def _rank_main(rank: int, world_size: int, device_name: str, connection: Connection) -> None:
    """A rank's whole life: join the world, then run what the driver sends until told to stop."""
    try:
        context = _join_world(rank, world_size, device_name, connection)
    except BaseException:
        connection.send((0, "error", traceback.format_exc()))
        return
    connection.send((0, "ok", "joined"))
    while (message := pickle.loads(connection.recv_bytes())) is not None:
        call_id, fn, args, reply_all = message
        try:
            result = fn(context, *args)
        except BaseException:
            connection.send((call_id, "error", traceback.format_exc()))
            continue
        if reply_all or rank == 0:
            connection.send((call_id, "ok", result))
    _leave_world()


def _join_world(rank: int, world_size: int, device_name: str, connection: Connection) -> RankContext:
    import torch
    import torch.distributed as dist

    device = _rank_device(device_name, rank)
    if rank == 0:
        store = dist.TCPStore(_LOOPBACK, 0, world_size, is_master=True, wait_for_workers=False)
        connection.send((0, "ok", store.port))
    else:
        store = dist.TCPStore(_LOOPBACK, connection.recv(), world_size, is_master=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # CPU ranks share the node's cores; each taking all of them oversubscribes the CPU (and
        # idle OpenMP threads spin) so that collectives wait on descheduled peers.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, device_id=device if device.type == "cuda" else None)
    return RankContext(rank, world_size, device)


def _rank_device(name: str, rank: int) -> Any:
    """auto: a GPU per rank if there are GPUs; "cuda" / "cuda:K": GPU (K +) rank; "cpu": the CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _leave_world() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --- the executor ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerDescription:
    """What the driver needs to know of the workers (rank 0's; every rank allocated alike)."""

    num_kv_blocks: int
    kv_layout: str
    kv_block_nbytes: int


def start_worker(context: RankContext, config: LongctxConfig) -> WorkerDescription:
    """On each rank: build its process groups and its ModelWorker."""
    from model_shards.parallel.groups import build_layout
    from model_shards.worker import ModelWorker

    parallel = config.parallel
    layout = build_layout(parallel.tensor_parallel_size, parallel.sequence_parallel_size, context.device)
    worker = context.state["worker"] = ModelWorker(config, layout, context.device)
    return WorkerDescription(worker.num_kv_blocks, worker.kv_layout, worker.kv_block_nbytes)


def execute_step(context: RankContext, step_input: StepInput) -> StepOutput:
    return context.state["worker"].execute(step_input)


def stop_worker(context: RankContext) -> None:
    worker = context.state.pop("worker", None)
    if worker is not None:
        worker.close()


class MultiprocessExecutor(DescribedExecutor):
    """tensor_parallel_size x sequence_parallel_size ranks on this node, one process each.

    `processes`: run on an existing world of the right size (tests reuse one across engines);
    the executor then leaves those processes running at shutdown."""

    def __init__(self, config: LongctxConfig, processes: RankProcesses | None = None):
        self._owns_processes = processes is None
        self.processes = processes or RankProcesses(config.parallel.world_size, config.model.device)
        if self.processes.world_size != config.parallel.world_size:
            raise ValueError(f"{self.processes.world_size} processes for a world of {config.parallel.world_size}")
        try:
            self.description: WorkerDescription = self.processes.call(start_worker, config)[0]
        except BaseException:
            self.shutdown()
            raise

    def execute(self, step_input: StepInput) -> StepOutput:
        return self.processes.call_first(execute_step, step_input)

    def shutdown(self) -> None:
        if self._owns_processes:
            self.processes.shutdown()
        else:
            self.processes.call(stop_worker)
