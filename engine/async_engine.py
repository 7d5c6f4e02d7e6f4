"""Asynchronous front of the engine: `async for delta in engine.generate(...)`, or
`async for deltas in engine.stream(...)` for every delta that is ready at once (a server that
forwards them sends one message per step, or fewer under load, not one per token).

The engine loop (engine/engine_loop.py) runs on one dedicated thread (`AsyncEngine`: its step is
compute-bound and releases the GIL inside torch), or in a child process (`serve.engine_loop`
process, engine/engine_process.py: the replica's HTTP Python then no longer shares the GIL with
it); callers on an asyncio loop send it named commands and get deltas back through per-request
inboxes (`EngineClient`, the caller side both share). Adding a request goes through the loop
too, so a bad request raises in the caller's `generate` (the HTTP layer turns that into a 400),
and an abort (a client that went away) frees the request's blocks before the next step. A request that fails inside a
step raises `RequestFailedError` in its own caller's `generate` only; the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from engine.engine_loop import BURST_WINDOW_GAPS, EngineDeadError, EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionDelta, EngineStats, RequestFailedError
from engine.summary import EngineSummary
from protocol.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["BURST_WINDOW_GAPS", "AsyncEngine", "EngineClient", "EngineDeadError"]


class _Inbox:
    """One stream's deltas, appended by the engine thread and taken by the caller's loop. The
    engine thread wakes that loop (a cross-thread call: a syscall and a loop turn) only while the
    caller waits in `get`; a caller pacing its stream sleeps meanwhile and takes everything after."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        # Set where the engine's deltas come from, when its add_request is answered: deltas under
        # this id made before then are a closed stream's of the same id, whose drop was queued first.
        self.added = False

    def mark_added(self, _future: concurrent.futures.Future) -> None:
        self.added = True

    def put(self, item: Any) -> asyncio.Future | None:
        """Engine thread: add `item`; returns the caller's waiter to wake, if it waits."""
        self._items.append(item)
        return self._waiter  # read after the append: see `get`

    async def get(self) -> Any:
        if not self._items:
            self._waiter = self.loop.create_future()
            try:
                # Set before looking again, so an item put meanwhile is either seen here or its
                # `put` sees the waiter (the GIL orders the two threads' steps).
                if not self._items:
                    await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> Any:
        return self._items.popleft()


class EngineClient:
    """The caller side, whatever runs the loop: streams with their inboxes and pacing. A transport
    (a subclass) sends named commands (`_submit`) and hands each step's deltas to `_dispatch`.

    `stream_chunks_per_s`: the most lists per second `stream` hands out over all requests
    together (0: one per step each). A server pays for every list it forwards (~0.4 ms of Python
    through Ray Serve per stream and step on the H200 host, holding the GIL the engine thread
    needs), so under load each stream waits its share, `num_streams / stream_chunks_per_s`, after
    its last list and then takes every delta ready; a first token and a last delta never wait."""

    def __init__(self, stream_chunks_per_s: float = 0.0):
        self.stream_chunks_per_s = stream_chunks_per_s
        self._subscribers: dict[str, _Inbox] = {}
        self._dead: BaseException | None = None

    # --- transport (subclasses) ------------------------------------------------------------
    def _submit(self, name: str, *args: Any) -> concurrent.futures.Future:
        """Send command `name` (engine/engine_loop.py `EngineLoop`) to the loop."""
        raise NotImplementedError

    # --- caller side (any asyncio loop) ----------------------------------------------------
    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> AsyncIterator[CompletionDelta]:
        batches = self.stream(request_id, prompt, params, cache_salt)
        async with aclosing(batches):  # a caller that leaves aborts the request now, not at GC
            async for deltas in batches:
                for delta in deltas:
                    yield delta

    async def stream(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> AsyncIterator[list[CompletionDelta]]:
        """Every delta of this request that is ready, as one list, in order: the first list as
        soon as the first token is made, each next one once this stream's share of
        `stream_chunks_per_s` has passed (at once without a budget). Closing this aborts the request."""
        self._raise_if_dead()
        if request_id in self._subscribers:
            raise InvalidParameterError("request_id", f"request {request_id!r} is already running")
        inbox = _Inbox(asyncio.get_running_loop())
        self._subscribers[request_id] = inbox
        remaining, last_list_at = params.n, -math.inf
        try:
            added = self._submit("add_request", request_id, prompt, params, cache_salt)
            added.add_done_callback(inbox.mark_added)  # on the delivering thread, before the next step's deltas
            await asyncio.wrap_future(added)
            while remaining:
                first = await inbox.get()
                if not _is_last(first, remaining):
                    await self._wait_for_turn(last_list_at)
                deltas, failure = _ready(first, inbox)
                last_list_at = inbox.loop.time()
                remaining -= sum(delta.finished for delta in deltas)
                if deltas:
                    yield deltas
                if failure is not None:  # an engine failure, or this request alone failed:
                    remaining -= isinstance(failure, RequestFailedError)  # its other sequences abort below
                    raise failure
        finally:
            self._subscribers.pop(request_id, None)
            if remaining and self._dead is None:
                self._submit("drop", request_id)

    async def _wait_for_turn(self, last_list_at: float) -> None:
        """Until this stream's share of the chunk budget has passed since its last list."""
        if not self.stream_chunks_per_s:
            return
        share_s = len(self._subscribers) / self.stream_chunks_per_s
        wait_s = last_list_at + share_s - asyncio.get_running_loop().time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)

    async def abort(self, request_id: str) -> None:
        await self._call("abort", request_id)

    async def _call(self, name: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self._submit(name, *args))

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")

    # --- delivery (the loop's thread, or the process transport's reader thread) -------------
    def _dispatch(self, deltas: list[CompletionDelta]) -> None:
        """Each stream's inbox gets its deltas in order; at most one wake-up per caller loop per
        step (not one per delta), and none for a loop whose streams are not waiting."""
        self._deliver((self._added_inbox(delta.request_id), delta) for delta in deltas)

    def _added_inbox(self, request_id: str) -> _Inbox | None:
        inbox = self._subscribers.get(request_id)
        return inbox if inbox is not None and inbox.added else None

    def _deliver(self, items) -> None:
        waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for inbox, item in items:
            waiter = inbox.put(item) if inbox is not None else None
            if waiter is not None:
                waiters.setdefault(inbox.loop, []).append(waiter)
        for loop, futures in waiters.items():
            loop.call_soon_threadsafe(_wake_all, futures)

    def _fail_streams(self, error: BaseException) -> None:
        """The loop is gone: every open stream gets EngineDeadError, and so does every new one."""
        self._dead = error
        dead = EngineDeadError(f"the engine stopped: {error!r}")
        self._deliver((inbox, dead) for inbox in list(self._subscribers.values()))


class AsyncEngine(EngineClient):
    """The engine loop on a thread of this process. `arrival_gap_s`, `arrival_max_wait_s`: an idle
    engine given a request while requests come together waits for the rest of the burst
    (engine/engine_loop.py `_arrivals_look_bursty`, `_gather_arrivals`); 0: never."""

    def __init__(self, engine: LLMEngine, stream_chunks_per_s: float = 0.0, arrival_gap_s: float = 0.0,
                 arrival_max_wait_s: float = 0.0):  # fmt: skip
        super().__init__(stream_chunks_per_s)
        self.engine = engine
        self._engine_loop = EngineLoop(engine, self._dispatch, self._fail_streams, arrival_gap_s, arrival_max_wait_s)
        self._thread = threading.Thread(target=self._engine_loop.run, name="longctx-engine", daemon=True)
        self._thread.start()

    def _submit(self, name: str, *args: Any) -> concurrent.futures.Future:
        return self._engine_loop.submit(name, *args)

    @property
    def arrival_gap_s(self) -> float:
        return self._engine_loop.arrival_gap_s

    @property
    def arrival_max_wait_s(self) -> float:
        return self._engine_loop.arrival_max_wait_s

    def set_arrival_gap(self, arrival_gap_s: float) -> None:
        """Changes `arrival_gap_s` on the running engine (0: gathering off), so one engine can
        measure both settings alternately (bench/serve_load.py --arrival-gap-ab): runs in separate
        processes differed 22-29% (docs/benchmarks.md, session 11). One attribute write; the engine
        thread reads it the next time it is given work while idle."""
        self._engine_loop.set_arrival_gap(arrival_gap_s)

    @property
    def last_step_time(self) -> float:
        return self._engine_loop.last_step_time

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step (no lock on the engine)."""
        return self._engine_loop.stats

    def summary(self) -> EngineSummary:
        return self.engine.summary()

    async def metrics_exposition(self) -> str:
        """The engine's KV-tier registry as Prometheus text (read here: the registry is thread-safe)."""
        return self._engine_loop.metrics_exposition()

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output in tokens."""
        return self.engine.max_model_len

    @property
    def kv_metrics_registry(self) -> Any:
        """The engine's KV-tier Prometheus registry (hit rates, transfers, decisions)."""
        return self.engine.kv_cache.metrics.registry

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def seconds_since_last_step(self) -> float:
        """0 while idle; how long the current step has run otherwise (stall detection)."""
        if not self.engine.has_unfinished_requests() and self._engine_loop.commands.empty():
            return 0.0
        return time.monotonic() - self.last_step_time

    def shutdown(self) -> None:
        self._submit("stop")
        self._thread.join(timeout=30)
        self.engine.shutdown()


def _wake_all(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        if not waiter.done():  # a caller cancelled meanwhile, or woken twice in one step
            waiter.set_result(None)


def _is_last(item: Any, remaining: int) -> bool:
    """A failure, or the final delta of the request's last running sequence: no reason to wait."""
    return isinstance(item, BaseException) or item.error is not None or (item.finished and remaining == 1)


def _ready(first: Any, source: _Inbox) -> tuple[list[CompletionDelta], BaseException | None]:
    """`first` and the deltas already queued behind it, up to the first failure: the engine's
    (an exception) or the request's own (a delta with an error), which comes back to be raised."""
    deltas: list[CompletionDelta] = []
    item = first
    while True:
        if isinstance(item, BaseException):
            return deltas, item
        if item.error is not None:
            return deltas, RequestFailedError(item.error)
        deltas.append(item)
        if source.empty():
            return deltas, None
        item = source.get_nowait()
