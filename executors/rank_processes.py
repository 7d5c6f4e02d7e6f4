"""Spawned local processes, one per rank, joined in one torch.distributed world.

The driver (this process) never imports torch. It pickles each call once and writes the same
bytes to every rank's pipe; the ranks run it in lock step (their collectives pair them up) and
only rank 0 answers, unless every rank's answer is asked for. A rank that fails sends its
traceback instead, and a rank that dies is seen through its process sentinel, so the driver raises
`RankFailure` rather than waiting for ever.

Rendezvous: rank 0 opens torch.distributed's TCPStore on port 0 (model_shards/rank.py), reports
the port, and the driver hands it to the other ranks. Processes are started with the `spawn`
method: CUDA cannot run in a forked child.
"""

from __future__ import annotations

import multiprocessing
import pickle
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from executors.base import RankFailure

_LOOPBACK = "127.0.0.1"


class RankProcesses:
    """`world_size` spawned processes in one torch.distributed world; the driver calls module-level
    functions `fn(context, *args)` (context: model_shards.rank.RankContext) on all of them."""

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

    def call_first(self, fn: Callable[..., Any], *args: Any, while_waiting: Callable[[], None] | None = None) -> Any:
        """Run fn on every rank; rank 0's result (the others answer only if they fail).
        `while_waiting()` runs here once the call is sent, before its answer is awaited."""
        self._send_all(fn, args, reply_all=False)
        if while_waiting is not None:
            while_waiting()
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
    """A rank process's whole life: join the world, then run what the driver sends until told to stop."""
    from model_shards.rank import leave_world

    try:
        context = _join(rank, world_size, device_name, connection)
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
    leave_world()


def _join(rank: int, world_size: int, device_name: str, connection: Connection) -> Any:
    from model_shards.rank import connect_store, join_world, open_store, rank_device

    if rank == 0:
        store = open_store(_LOOPBACK, world_size)
        connection.send((0, "ok", store.port))
    else:
        store = connect_store(_LOOPBACK, connection.recv(), world_size)
    return join_world(rank, world_size, rank_device(device_name, rank), store)
