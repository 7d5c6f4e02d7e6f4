"""Asynchronous front of the engine: `async for delta in engine.generate(...)`, or
`async for deltas in engine.stream(...)` for every delta that is ready at once (a server that
forwards them sends one message per step, or fewer under load, not one per token).

The LLMEngine runs on one dedicated thread (its step is compute-bound and releases the GIL inside
torch); callers on an asyncio loop talk to it through a command queue and get deltas back through
per-request asyncio queues. Adding a request goes through the loop thread too, so a bad request
raises in the caller's `generate` (the HTTP layer turns that into a 400), and an abort (a client
that went away) frees the request's blocks before the next step. A request that fails inside a
step raises `RequestFailedError` in its own caller's `generate` only; the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import queue
import threading
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from cluster.config import LongctxConfig
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionDelta, EngineStats, RequestFailedError
from protocol.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)

# An idle engine given a request gathers arrivals (`arrival_gap_s`) only while requests come
# together: after a step taken with several requests open, it counts as bursty for this many gaps
# (20 ms at 4 ms): long enough for the clients answered in that step to ask again (their requests
# reached the replica 1-8 ms apart through HTTP on the CPU machine, docs/benchmarks.md), short
# enough that a lone request after a quiet period starts at once.
BURST_WINDOW_GAPS = 5


class EngineDeadError(RuntimeError):
    """The engine loop failed; every request in flight gets this, and new ones too."""


class _Inbox:
    """One stream's deltas, appended by the engine thread and taken by the caller's loop. The
    engine thread wakes that loop (a cross-thread call: a syscall and a loop turn) only while the
    caller waits in `get`; a caller pacing its stream sleeps meanwhile and takes everything after."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

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


class AsyncEngine:
    """`stream_chunks_per_s`: the most lists per second `stream` hands out over all requests
    together (0: one per step each). A server pays for every list it forwards (~0.4 ms of Python
    through Ray Serve per stream and step on the H200 host, holding the GIL the engine thread
    needs), so under load each stream waits its share, `num_streams / stream_chunks_per_s`, after
    its last list and then takes every delta ready; a first token and a last delta never wait.

    `arrival_gap_s`, `arrival_max_wait_s`: an idle engine given a request while requests come
    together waits for the rest of the burst (`_arrivals_look_bursty`, `_gather_arrivals`); 0: never."""

    def __init__(self, engine: LLMEngine, stream_chunks_per_s: float = 0.0, arrival_gap_s: float = 0.0,
                 arrival_max_wait_s: float = 0.0):  # fmt: skip
        self.engine = engine
        self.stream_chunks_per_s = stream_chunks_per_s
        self.arrival_gap_s = arrival_gap_s
        self.arrival_max_wait_s = arrival_max_wait_s
        self._several_open_at_s = -math.inf  # monotonic: the end of the last step taken with 2+ requests open
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._subscribers: dict[str, _Inbox] = {}
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self.last_step_time = time.monotonic()  # health checks compare it with now
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run_loop, name="longctx-engine", daemon=True)
        self._thread.start()

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
            await self._call(lambda: self.engine.add_request(request_id, prompt, params, cache_salt))
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
                self._submit(lambda: self.engine.abort_request(request_id))

    async def _wait_for_turn(self, last_list_at: float) -> None:
        """Until this stream's share of the chunk budget has passed since its last list."""
        if not self.stream_chunks_per_s:
            return
        share_s = len(self._subscribers) / self.stream_chunks_per_s
        wait_s = last_list_at + share_s - asyncio.get_running_loop().time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)

    def set_arrival_gap(self, arrival_gap_s: float) -> None:
        """Changes `arrival_gap_s` on the running engine (0: gathering off), so one engine can
        measure both settings alternately (bench/serve_load.py --arrival-gap-ab): runs in separate
        processes differed 22-29% (docs/benchmarks.md, session 11). One attribute write; the engine
        thread reads it the next time it is given work while idle."""
        if not arrival_gap_s >= 0:
            raise ValueError(f"arrival_gap_s must be >= 0, got {arrival_gap_s!r}")
        self.arrival_gap_s = arrival_gap_s

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self._dispatch(self.engine.abort_request(request_id)))

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step (no lock on the engine)."""
        return self._stats

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
        if not self.engine.has_unfinished_requests() and self._commands.empty():
            return 0.0
        return time.monotonic() - self.last_step_time

    def shutdown(self) -> None:
        self._stop.set()
        self._submit(lambda: None)  # wake the loop
        self._thread.join(timeout=30)
        self.engine.shutdown()

    async def _call(self, function: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(function))

    def _submit(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((function, future))
        return future

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")

    # --- engine thread ---------------------------------------------------------------------
    def _run_loop(self) -> None:
        try:
            while not self._stop.is_set():
                idle = not self.engine.has_unfinished_requests()
                self._run_commands(block=idle)
                if idle and self.engine.has_unfinished_requests() and self._arrivals_look_bursty():
                    self._gather_arrivals()
                if self.engine.has_unfinished_requests():
                    self._step()
                self.last_step_time = time.monotonic()
                self._stats = self.engine.stats()
        except BaseException as error:  # noqa: BLE001 - every failure must reach every caller
            logger.exception("engine loop failed")
            self._fail_everything(error)

    def _run_commands(self, block: bool) -> None:
        try:
            function, future = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(function, future)
            try:
                function, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        # Counted before the step, so the requests it finishes count; len() of the dict the callers'
        # loops change is one read under the GIL.
        several_open = len(self._subscribers) > 1
        self._dispatch(self.engine.step())
        if several_open:
            self._several_open_at_s = time.monotonic()

    def _arrivals_look_bursty(self) -> bool:
        """Whether an idle engine just given work should wait for more (`_gather_arrivals`): only
        when requests come together, i.e. several are open now (they arrived at once) or were at a
        step that ended less than `BURST_WINDOW_GAPS` gaps ago (clients answered in that step ask
        again). A lone request after a quiet period, or a client sending one request after another,
        starts at once: nothing would come to share its step, so waiting only adds the gap to its
        TTFT. Requests (open streams), not arrival times, decide: a client sending one short request
        after another arrives as often as a burst does, yet never has a second one open."""
        if self.arrival_gap_s <= 0:
            return False
        window_s = BURST_WINDOW_GAPS * self.arrival_gap_s
        return len(self._subscribers) > 1 or time.monotonic() - self._several_open_at_s < window_s

    def _gather_arrivals(self) -> None:
        """An idle engine that has just been given work takes the requests still arriving, until
        none has come for `arrival_gap_s` or `arrival_max_wait_s` has passed. A burst (clients
        answered in the same step asking again, a batch job) reaches the engine over a few ms, one
        request at a time as the server parses each body; started at the first, the step would
        prefill it alone and admit the rest behind it at the budget capped for decoding
        (`max_tokens_per_step_while_decoding`), over several steps. Gathered, they share one.
        Called only when arrivals look bursty (`_arrivals_look_bursty`)."""
        deadline = time.monotonic() + self.arrival_max_wait_s
        while (wait_s := min(self.arrival_gap_s, deadline - time.monotonic())) > 0:
            try:
                function, future = self._commands.get(timeout=wait_s)
            except queue.Empty:
                return
            self._run_command(function, future)

    @staticmethod
    def _run_command(function, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller went away before its command ran
        try:
            future.set_result(function())
        except Exception as error:  # noqa: BLE001 - handed to the caller, who raises it
            future.set_exception(error)

    def _dispatch(self, deltas: list[CompletionDelta]) -> None:
        """Each stream's inbox gets its deltas in order; at most one wake-up per caller loop per
        step (not one per delta), and none for a loop whose streams are not waiting."""
        self._deliver((self._subscribers.get(delta.request_id), delta) for delta in deltas)

    def _deliver(self, items) -> None:
        waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for inbox, item in items:
            waiter = inbox.put(item) if inbox is not None else None
            if waiter is not None:
                waiters.setdefault(inbox.loop, []).append(waiter)
        for loop, futures in waiters.items():
            loop.call_soon_threadsafe(_wake_all, futures)

    def _fail_everything(self, error: BaseException) -> None:
        self._dead = error
        dead = EngineDeadError(f"the engine stopped: {error!r}")
        self._deliver((inbox, dead) for inbox in list(self._subscribers.values()))
        while not self._commands.empty():
            _, future = self._commands.get_nowait()
            if future.set_running_or_notify_cancel():
                future.set_exception(dead)


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


def serving_engine(config: LongctxConfig) -> AsyncEngine:
    """The engine a replica serves from, with the config's `serve` settings (stream pacing, arrival
    gathering): the served replica and the bench's direct mode build it alike, so their rows compare
    the same engine (session 11's direct rows ran without the gap they were labelled with)."""
    settings = config.serve
    return AsyncEngine(LLMEngine(config), settings.stream_chunks_per_s, settings.arrival_gap_s,
                       settings.arrival_max_wait_s)
