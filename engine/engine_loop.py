"""The engine side of the async engine: one loop that runs named commands, gathers arrivals,
steps the LLMEngine and publishes each step's deltas and a stats snapshot.

The same loop runs on a thread of the replica process (engine/async_engine.py `AsyncEngine`) or
in a child process (engine/engine_process.py). Commands are names with arguments, not callables,
so a child process can receive them through a pipe (lambdas cannot be pickled). Each command
carries a `concurrent.futures.Future` that the loop resolves with the command's result or error.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import threading
import time
from typing import Any, Callable

from prometheus_client import generate_latest

from engine.gc_pauses import GcPauses
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionDelta, EngineStats

logger = logging.getLogger(__name__)

# An idle engine given a request gathers arrivals (`arrival_gap_s`) only while requests come
# together: after a step taken with several requests open, it counts as bursty for this many gaps
# (20 ms at 4 ms): long enough for the clients answered in that step to ask again (their requests
# reached the replica 1-8 ms apart through HTTP on the CPU machine, docs/benchmarks.md), short
# enough that a lone request after a quiet period starts at once.
BURST_WINDOW_GAPS = 5

# How long an idle loop blocks for a command before looking at its stop flag again.
IDLE_POLL_S = 0.5

Command = tuple[str, tuple, concurrent.futures.Future]  # (name, arguments, the caller's future)


class EngineDeadError(RuntimeError):
    """The engine loop failed; every request in flight gets this, and new ones too."""


class EngineLoop:
    """`deliver(deltas)` is called on the loop's thread right after each step (and with an
    abort's deltas); `after_iteration()` once per loop turn, after `stats` and `last_step_time` are
    updated; `on_failure(error)` once if the loop dies, before the queued commands fail."""

    def __init__(self, engine: LLMEngine, deliver: Callable[[list[CompletionDelta]], None],
                 on_failure: Callable[[BaseException], None], arrival_gap_s: float = 0.0,
                 arrival_max_wait_s: float = 0.0, after_iteration: Callable[[], None] | None = None):  # fmt: skip
        self.engine = engine
        self.deliver = deliver
        self.on_failure = on_failure
        self.after_iteration = after_iteration
        self.arrival_gap_s = arrival_gap_s
        self.arrival_max_wait_s = arrival_max_wait_s
        self.commands: queue.Queue[Command] = queue.Queue()
        self.last_step_time = time.monotonic()  # health checks compare it with now
        self.stats: EngineStats = engine.stats()
        self._several_open_at_s = -math.inf  # monotonic: the end of the last step taken with 2+ requests open
        self._stop = threading.Event()
        # When the loop's wait for a command began (perf_counter), None while it works: a reader of
        # the metrics counts the wait up to its read (`_count_idle_until_now`), so a counter read
        # while the loop waits is exact. The loop polls every IDLE_POLL_S; before session 18 a read
        # missed up to that much idle time, which then fell into the next reader's window.
        self._idle_since: float | None = None
        self._idle_lock = threading.Lock()
        # Every garbage collection of this process while the loop runs (engine/gc_pauses.py).
        self.gc_pauses = GcPauses(engine.step_metrics.observe_gc)
        # Looked up on the engine at each call, as a direct call would (a test may patch them).
        self._handlers: dict[str, Callable[..., Any]] = {
            "add_request": lambda *args: self.engine.add_request(*args),
            # A request the caller prepared already (engine/request_preparer.py), off this thread.
            "add_prepared": lambda prepared: self.engine.add_prepared(prepared),
            "abort": self.abort,
            "drop": self.drop,
            "set_arrival_gap": self.set_arrival_gap,
            "summary": lambda: self.engine.summary(),
            "metrics_exposition": self.metrics_exposition,
            "stop": self._stop.set,
        }

    # --- commands --------------------------------------------------------------------------
    def submit(self, name: str, *args: Any) -> concurrent.futures.Future:
        """Any thread: queue command `name`; the future resolves once the loop has run it."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.put(name, args, future)
        return future

    def has_command(self, name: str) -> bool:
        return name in self._handlers

    def put(self, name: str, args: tuple, future: concurrent.futures.Future) -> None:
        """Any thread: queue command `name` with the caller's own `future` (a callback added to it
        before this runs on the loop's thread)."""
        if not self.has_command(name):
            raise ValueError(f"unknown engine command {name!r}")
        self.commands.put((name, args, future))

    def abort(self, request_id: str) -> None:
        self.deliver(self.engine.abort_request(request_id))

    def drop(self, request_id: str) -> None:
        """Abort a closed stream's request without delivering its deltas: its id may already name
        a new stream, whose add_request is queued behind this."""
        self.engine.abort_request(request_id)

    def set_arrival_gap(self, arrival_gap_s: float) -> None:
        if not arrival_gap_s >= 0:
            raise ValueError(f"arrival_gap_s must be >= 0, got {arrival_gap_s!r}")
        self.arrival_gap_s = arrival_gap_s

    def metrics_exposition(self) -> str:
        """The engine's Prometheus registry (its steps and loop, the KV tiers) as text; any thread."""
        self._count_idle_until_now()
        return generate_latest(self.engine.kv_cache.metrics.registry).decode()

    def _count_idle_until_now(self, wait_ends: bool = False) -> float:
        """Adds the loop's wait so far (if it waits) to its idle time; returns now. A metrics reader
        moves the wait's start to now; the loop, whose wait ends (`wait_ends`), clears it."""
        with self._idle_lock:
            now = time.perf_counter()
            if self._idle_since is not None:
                self.engine.step_metrics.observe_loop("idle", now - self._idle_since)
                self._idle_since = None if wait_ends else now
            return now

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        """Until a `stop` command; a failure reaches `on_failure` and every queued command."""
        self.gc_pauses.install()
        try:
            self.engine.warm_up_stepping_thread()
            while not self._stop.is_set():
                self._iterate()
        except BaseException as error:  # noqa: BLE001 - every failure must reach every caller
            logger.exception("engine loop failed")
            self.on_failure(error)
            self._fail_queued(EngineDeadError(f"the engine stopped: {error!r}"))
        finally:
            self.gc_pauses.uninstall()

    def _iterate(self) -> None:
        idle = not self.engine.has_unfinished_requests()
        self._run_commands(block=idle)
        if idle and self.engine.has_unfinished_requests() and self._arrivals_look_bursty():
            self._gather_arrivals()
        if self.engine.has_unfinished_requests():
            self._step()
        self.last_step_time = time.monotonic()
        published_from = time.perf_counter()
        self.stats = self.engine.stats()
        if self.after_iteration is not None:
            self.after_iteration()
        self._observe("publish", published_from)

    def _run_commands(self, block: bool) -> None:
        with self._idle_lock:
            self._idle_since = time.perf_counter()
        try:
            command = self.commands.get(timeout=IDLE_POLL_S) if block else self.commands.get_nowait()
        except queue.Empty:
            self._count_idle_until_now(wait_ends=True)
            return
        started = self._count_idle_until_now(wait_ends=True)
        while True:
            self._run_command(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                self._observe("commands", started)
                return

    def _step(self) -> None:
        # Counted before the step, so the requests it finishes count.
        several_open = self.engine.num_open_requests() > 1
        started = time.perf_counter()
        # The engine delivers (scheduler.overlap_outputs: a step's deltas while the next runs).
        self.engine.step(self.deliver)
        self._observe("step", started)
        if several_open:
            self._several_open_at_s = time.monotonic()

    def _observe(self, activity: str, started: float) -> float:
        """Adds the time since `started` (perf_counter) to `activity`; returns now."""
        now = time.perf_counter()
        self.engine.step_metrics.observe_loop(activity, now - started)
        return now

    def _arrivals_look_bursty(self) -> bool:
        """Whether an idle engine just given work should wait for more (`_gather_arrivals`): only
        when requests come together, i.e. several are open now (they arrived at once) or were at a
        step that ended less than `BURST_WINDOW_GAPS` gaps ago (clients answered in that step ask
        again). A lone request after a quiet period, or a client sending one request after another,
        starts at once: nothing would come to share its step, so waiting only adds the gap to its
        TTFT. Requests open, not arrival times, decide: a client sending one short request after
        another arrives as often as a burst does, yet never has a second one open."""
        if self.arrival_gap_s <= 0:
            return False
        window_s = BURST_WINDOW_GAPS * self.arrival_gap_s
        return self.engine.num_open_requests() > 1 or time.monotonic() - self._several_open_at_s < window_s

    def _gather_arrivals(self) -> None:
        """An idle engine that has just been given work takes the requests still arriving, until
        none has come for `arrival_gap_s` or `arrival_max_wait_s` has passed. A burst (clients
        answered in the same step asking again, a batch job) reaches the engine over a few ms, one
        request at a time as the server parses each body; started at the first, the step would
        prefill it alone and admit the rest behind it at the budget capped for decoding
        (`max_tokens_per_step_while_decoding`), over several steps. Gathered, they share one.
        Called only when arrivals look bursty (`_arrivals_look_bursty`)."""
        started, deadline = time.perf_counter(), time.monotonic() + self.arrival_max_wait_s
        while (wait_s := min(self.arrival_gap_s, deadline - time.monotonic())) > 0:
            try:
                command = self.commands.get(timeout=wait_s)
            except queue.Empty:
                break
            self._run_command(command)
        self._observe("gather", started)

    def _run_command(self, command: Command) -> None:
        name, args, future = command
        if not future.set_running_or_notify_cancel():
            return  # the caller went away before its command ran
        handler = self._handlers[name]
        try:
            future.set_result(handler(*args))
        except Exception as error:  # noqa: BLE001 - handed to the caller, who raises it
            future.set_exception(error)

    def _fail_queued(self, dead: EngineDeadError) -> None:
        while not self.commands.empty():
            _, _, future = self.commands.get_nowait()
            if future.set_running_or_notify_cancel():
                future.set_exception(dead)
