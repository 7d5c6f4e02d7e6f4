"""Python's garbage collector in a serving process: the start-up's objects frozen, every pause timed.

A collection stops every thread of the process (it holds the GIL). A full one (generation 2)
walks every tracked container object, and after torch, the tokenizer, Ray and the model are
loaded there are ~300K of them: 130-160 ms a full collection on the 2-core CI machine, i.e. a
stall of the engine's step, or of a replica's streams, inside some request. Nearly all of those
objects live as long as the process, so `freeze_startup_objects` moves them into the permanent
generation (`gc.freeze`, as vLLM and SGLang do after start-up), which collections skip; what
requests allocate later is still collected as before.

`GcPauses` times each collection (gc.callbacks) into the engine's step metrics, by generation:
`longctx_engine_gc_collections_total` and `longctx_engine_gc_pause_seconds_total`, so a run's
pauses show beside its steps (bench/engine_steps.py) and on the dashboards.
"""

from __future__ import annotations

import gc
import logging
import time

from engine.step_metrics import StepMetrics

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
    """Times every garbage collection of this process into `metrics` (the engine's step metrics),
    from `install` until `uninstall`."""

    def __init__(self, metrics: StepMetrics):
        self.metrics = metrics
        self._started: float | None = None

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        """gc's callback: "start" then "stop" of one collection, on the thread that triggered it."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # installed between a start and its stop
            return
        self.metrics.observe_gc(info["generation"], time.perf_counter() - self._started)
        self._started = None
