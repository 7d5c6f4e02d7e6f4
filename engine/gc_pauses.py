"""Python's garbage collector in a serving process: the start-up's objects frozen, every pause timed.

A collection stops every thread of the process (it holds the GIL). A full one (generation 2)
walks every tracked container object, and after torch, the tokenizer, Ray and the model are
loaded there are ~300K of them: 130-160 ms a full collection on the 2-core CI machine, i.e. a
stall of the engine's step, or of a replica's streams, inside some request. Nearly all of those
objects live as long as the process, so `freeze_startup_objects` moves them into the permanent
generation (`gc.freeze`, as vLLM and SGLang do after start-up), which collections skip; what
requests allocate later is still collected as before.

`GcPauses` times each collection (gc.callbacks): the engine loop's go to its step metrics
(`longctx_engine_gc_collections_total`, `longctx_engine_gc_pause_seconds_total`, by generation),
so a run's pauses show beside its steps (bench/engine_steps.py); a Serve replica's process counts
its own (`ProcessGcMetrics`, `longctx_replica_gc_*`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest

from engine.step_metrics import GC_GENERATIONS

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect once, then freeze every object left (the start-up's) out of later collections;
    returns how many were frozen. Once per serving process, when its start-up is done: objects
    frozen are never collected, so a process that keeps building and dropping engines (tests)
    must not call it."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("froze %d start-up objects out of garbage collection (%.0f ms)", frozen,
                (time.perf_counter() - started) * 1e3)
    return frozen


class GcPauses:
    """Times every garbage collection of this process, from `install` until `uninstall`:
    `observe(generation, seconds)` once per collection, on the thread that triggered it."""

    def __init__(self, observe: Callable[[int, float], None]):
        self.observe = observe
        self._started: float | None = None

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        """gc's callback: "start" then "stop" of one collection."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # installed between a start and its stop
            return
        self.observe(info["generation"], time.perf_counter() - self._started)
        self._started = None


class ProcessGcMetrics:
    """A serving process's own collections (a Serve replica's: HTTP, streams, preparing requests),
    whatever thread triggered them: `longctx_replica_gc_collections_total{generation}` and
    `longctx_replica_gc_pause_seconds_total{generation}` in a registry of their own, exported with
    the replica's series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.collections = Counter("longctx_replica_gc_collections", "Garbage collections of the replica's "
                                   "process, by generation (2: full).", ["generation"], registry=self.registry)
        self.pause_seconds = Counter("longctx_replica_gc_pause_seconds", "Wall time of those collections (every "
                                     "thread of the process stops), by generation.", ["generation"],
                                     registry=self.registry)  # fmt: skip
        for generation in GC_GENERATIONS:
            self.collections.labels(generation)
            self.pause_seconds.labels(generation)
        self.pauses = GcPauses(self._observe)

    def _observe(self, generation: int, seconds: float) -> None:
        self.collections.labels(str(generation)).inc()
        self.pause_seconds.labels(str(generation)).inc(seconds)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
