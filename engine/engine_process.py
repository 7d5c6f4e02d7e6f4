"""The engine loop in a child process (`serve.engine_loop: process`).

On a thread, the engine loop shares the replica's GIL with the HTTP/SSE Python: under load (16-64
streams) served throughput was 31-44% below the engine driven directly. Here the child (started
with `spawn`: no forked CUDA or Ray state) builds the LLMEngine and runs `EngineLoop`; the replica
process keeps only HTTP and the streams (`ProcessEngine`, the caller side `EngineClient`).

Two one-way pipes. Parent -> child: (name, command_id, args) commands (engine/engine_loop.py
names them). Child -> parent: ("ready", request_limits, stats) once, then ("step", deltas, stats)
after each loop turn, ("reply", command_id, ok, value_or_exception) and ("dead", error_repr).
EOF is the end on both sides: the child stops when the parent's command pipe closes, and the
parent fails every open stream with EngineDeadError when the child's event pipe does.

The parent prepares each request itself (engine/request_preparer.py: tokens, checks, block
hashes, from the limits the child sent when ready) and sends `add_prepared`: that Python would
otherwise hold the child's GIL beside the step thread. A prepared prompt crosses the pipe as its
uint32 bytes (engine/request_preparer.py `PreparedRequest`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import pickle
import sys
import threading
import time
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from cluster.config import LongctxConfig
from engine.async_engine import EngineClient
from engine.engine_loop import EngineDeadError, EngineLoop
from engine.gc_pauses import freeze_startup_objects
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionDelta, EngineStats
from engine.request_preparer import RequestLimits, RequestPreparer
from engine.summary import EngineSummary
from executors import executor_backend
from model_folder.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # a stop waits for the step in progress (seconds at a long prefill)
KILL_TIMEOUT_S = 5.0  # after terminate (SIGTERM), before SIGKILL
SUMMARY_TIMEOUT_S = 60.0  # summary() is synchronous: it waits at most this for the child's answer


# --- child process ------------------------------------------------------------------------------
# The packages whose loggers report from inside the engine (long prefills, Redis state, ranks).
ENGINE_LOG_PACKAGES = ("engine", "kvcache", "executors")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_engine_process(config: LongctxConfig, commands: Connection, events: Connection,
                       log_levels: dict[str, int]) -> None:  # fmt: skip
    """The child's entry point (module level: spawn imports it by name)."""
    _log_to_stderr(log_levels)
    sys.setswitchinterval(config.serve.engine_switch_interval_s)  # this interpreter serves the step thread first
    sender = _Sender(events)
    try:
        engine = LLMEngine(config)
    except BaseException as error:  # noqa: BLE001 - the parent waits for ready or this
        sender.send(("dead", f"the engine failed to start: {error!r}"))
        raise
    child = _ChildLoop(engine, sender, config)
    freeze_startup_objects()  # this process only serves from here on (engine/gc_pauses.py)
    sender.send(("ready", engine.preparer.limits, child.loop.stats))
    threading.Thread(target=child.receive, args=(commands,), name="longctx-engine-commands", daemon=True).start()
    try:
        child.loop.run()
    finally:
        engine.shutdown()


def _log_levels_to_mirror() -> dict[str, int]:
    """{package: level} of the engine's packages that log through a handler in this process (a
    replica's stderr, deployments/llm_server.py): a spawned child starts with no handlers."""
    loggers = (logging.getLogger(name) for name in ENGINE_LOG_PACKAGES)
    return {logger.name: logger.level for logger in loggers if logger.handlers}


def _log_to_stderr(log_levels: dict[str, int]) -> None:
    for name, level in log_levels.items():
        handler = logging.StreamHandler()  # the parent's stderr: the child inherits its descriptor
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(level)


class _Sender:
    """One pipe end, several threads: `Connection.send` writes a message in pieces."""

    def __init__(self, connection: Connection):
        self._connection = connection
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._lock:
            self._connection.send(message)


class _ChildLoop:
    """The loop plus its pipes: one message a turn. A step's deltas go out as soon as the engine
    delivers them, with the stats of the turn before: with scheduler.overlap_outputs they come
    while the next step runs, and holding them to the turn's end would delay every token by a
    step. A turn that sent nothing sends its stats at its end, as does one that leaves the engine
    idle (its final stats). Every callback runs on the loop's thread: the receiver adds them to a
    future before queueing it; an abort's deltas go out before its reply."""

    def __init__(self, engine: LLMEngine, sender: _Sender, config: LongctxConfig):
        self._sender = sender
        self._pending: list[CompletionDelta] = []
        self._sent_this_turn = False
        settings = config.serve
        self.loop = EngineLoop(engine, self._deliver, self._report_failure, settings.arrival_gap_s,
                               settings.arrival_max_wait_s, after_iteration=self._end_turn)

    def receive(self, commands: Connection) -> None:
        """Receiver thread: drains the command pipe into the loop's queue while the loop steps, so
        a parent sending a long prompt never waits on a full pipe. EOF (the parent is gone) stops it."""
        while True:
            try:
                name, command_id, args = commands.recv()
            except (EOFError, OSError):
                name, command_id, args = "stop", None, ()
            if not self.loop.has_command(name):  # the parent's bug: answered here, nothing queued
                self._sender.send(("reply", command_id, False, ValueError(f"unknown engine command {name!r}")))
                continue
            future: concurrent.futures.Future = concurrent.futures.Future()
            if command_id is not None:
                future.add_done_callback(partial(self._reply, command_id))
            self.loop.put(name, args, future)
            if name == "stop":
                return

    def _deliver(self, deltas: list[CompletionDelta]) -> None:
        if deltas:
            self._pending.extend(deltas)
            self._publish()

    def _end_turn(self) -> None:
        if self._pending or not self._sent_this_turn or not self.loop.engine.has_unfinished_requests():
            self._publish()
        self._sent_this_turn = False

    def _publish(self) -> None:
        deltas, self._pending[:] = list(self._pending), []
        self._sender.send(("step", deltas, self.loop.stats))
        self._sent_this_turn = True

    def _reply(self, command_id: int, future: concurrent.futures.Future) -> None:
        if self._pending:
            self._publish()
        error = future.exception()
        try:
            if error is None:
                self._sender.send(("reply", command_id, True, future.result()))
                return
        except (pickle.PicklingError, TypeError, AttributeError) as unpicklable:
            error = unpicklable
        self._sender.send(("reply", command_id, False, _picklable(error)))

    def _report_failure(self, error: BaseException) -> None:
        self._sender.send(("dead", repr(error)))


def _picklable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return RuntimeError(repr(error))


# --- parent (replica) process -------------------------------------------------------------------
class ProcessEngine(EngineClient):
    """The caller side of an engine loop running in a spawned child process. Spawn imports the
    starting script's main module again in the child: a script builds one under
    `if __name__ == "__main__":` (Serve replicas, pytest and `longctx` commands do)."""

    def __init__(self, config: LongctxConfig):
        if executor_backend(config) == "ray":
            raise ValueError("serve.engine_loop process needs local ranks: the engine's child process is no "
                             "Ray worker (set parallel.executor local, or engine_loop thread)")
        settings = config.serve
        super().__init__(settings.stream_chunks_per_s)
        self._arrival_gap_s = settings.arrival_gap_s
        self.arrival_max_wait_s = settings.arrival_max_wait_s
        self._send_lock = threading.Lock()  # one command at a time on the pipe; guards _pending, _closed
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._command_ids = itertools.count()
        self._closed = False
        self._process, self._commands, self._events = _start_child(config)
        # Before multiprocessing's own exit hook (atexit runs last-registered first), which joins
        # the child: closing the command pipe is what lets the child exit.
        atexit.register(self._close_commands)
        limits, self._stats = self._wait_until_ready()  # the child's start-up errors first (a bad folder)
        try:
            self._preparer = RequestPreparer(Tokenizer.from_folder(config.model.path), limits)
        except BaseException:
            self.shutdown()  # no child left behind a constructor that failed
            raise
        self.max_model_len = limits.max_model_len
        self.last_step_time = time.monotonic()
        self._reader = threading.Thread(target=self._read_events, name="longctx-engine-events", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _wait_until_ready(self) -> tuple[RequestLimits, EngineStats]:
        try:
            message = self._events.recv()
        except (EOFError, OSError):
            self._process.join(KILL_TIMEOUT_S)
            message = ("dead", f"the engine process exited while starting (exit code {self._process.exitcode})")
        if message[0] != "ready":
            self.shutdown()
            raise EngineDeadError(message[1])
        return message[1], message[2]

    # --- transport -----------------------------------------------------------------------
    def _submit(self, name: str, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if name == "add_request":  # prepared here, on the caller's thread, before it is sent
            try:
                name, args = "add_prepared", (self._preparer.prepare(*args),)
            except Exception as error:  # noqa: BLE001 - a refusal (400), raised in the caller's stream
                future.set_exception(error)
                return future
        with self._send_lock:
            if self._closed:
                future.set_exception(EngineDeadError(f"the engine stopped: {self._dead!r}"))
                return future
            command_id = next(self._command_ids)
            self._pending[command_id] = future  # before the send: the reply may come at once
            try:
                self._commands.send((name, command_id, args))
            except (OSError, ValueError) as error:  # the child is gone (or the pipe closed)
                del self._pending[command_id]
                future.set_exception(EngineDeadError(f"the engine process is gone: {error!r}"))
        return future

    def _read_events(self) -> None:
        """Reader thread: deltas to the inboxes, replies to their futures, until EOF."""
        try:
            while True:
                self._handle(self._events.recv())
        except (EOFError, OSError):
            pass
        self._process.join(KILL_TIMEOUT_S)
        self._fail_everything(RuntimeError(f"the engine process exited (exit code {self._process.exitcode})"))

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, deltas, stats = message
            self._stats, self.last_step_time = stats, time.monotonic()
            if deltas:
                self._dispatch(deltas)
        elif kind == "reply":
            _, command_id, ok, value = message
            _resolve(self._pending.pop(command_id, None), ok, value)
        elif kind == "dead":
            logger.error("the engine process failed: %s", message[1])
            self._fail_everything(RuntimeError(message[1]))

    def _fail_everything(self, error: BaseException) -> None:
        if self._dead is None:
            self._fail_streams(error)
        with self._send_lock:
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            _resolve(future, False, EngineDeadError(f"the engine stopped: {self._dead!r}"))

    # --- the engine's state --------------------------------------------------------------
    @property
    def arrival_gap_s(self) -> float:
        return self._arrival_gap_s

    def set_arrival_gap(self, arrival_gap_s: float) -> None:
        """As AsyncEngine's; the child applies it before its next command."""
        if not arrival_gap_s >= 0:
            raise ValueError(f"arrival_gap_s must be >= 0, got {arrival_gap_s!r}")
        self._submit("set_arrival_gap", arrival_gap_s)
        self._arrival_gap_s = arrival_gap_s

    def stats(self) -> EngineStats:
        """The snapshot the child sent after its last loop turn."""
        return self._stats

    def summary(self) -> EngineSummary:
        """Blocks this thread for a round trip (after the child's step in progress)."""
        return self._submit("summary").result(timeout=SUMMARY_TIMEOUT_S)

    async def metrics_exposition(self) -> str:
        return await self._call("metrics_exposition")

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._process.is_alive()

    def seconds_since_last_step(self) -> float:
        """0 while idle; how long since the child's last loop turn otherwise (stall detection)."""
        stats = self._stats
        if not self._pending and not (stats.num_running or stats.num_waiting):
            return 0.0
        return time.monotonic() - self.last_step_time

    def shutdown(self) -> None:
        """Stop, wait for the child, then terminate (and kill) it; idempotent."""
        if self._process.is_alive():
            self._submit("stop")
            self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(KILL_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._close_commands()
        atexit.unregister(self._close_commands)
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(KILL_TIMEOUT_S)

    def _close_commands(self) -> None:
        with self._send_lock:
            self._closed = True
            self._commands.close()


def _resolve(future: concurrent.futures.Future | None, ok: bool, value: Any) -> None:
    """A caller cancelled while its command ran (its asyncio task was): nothing to resolve. The
    command ran in the child regardless; a cancelled stream's abort follows its add_request."""
    if future is None or not future.set_running_or_notify_cancel():
        return
    future.set_result(value) if ok else future.set_exception(value)


def _start_child(config: LongctxConfig) -> tuple[multiprocessing.process.BaseProcess, Connection, Connection]:
    """The child process, the command pipe's sending end and the event pipe's receiving end."""
    context = multiprocessing.get_context("spawn")
    commands_out, commands_in = context.Pipe(duplex=False)  # (receiving end, sending end)
    events_out, events_in = context.Pipe(duplex=False)
    # Not a daemon: a daemon may not start processes, and an engine of several ranks starts one each.
    process = context.Process(target=run_engine_process, name="longctx-engine",
                              args=(config, commands_out, events_in, _log_levels_to_mirror()))
    process.start()
    # Only the child holds these now, so a pipe's EOF means the other side is gone.
    commands_out.close()
    events_in.close()
    return process, commands_in, events_out
