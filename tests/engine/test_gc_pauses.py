"""engine/gc_pauses.py: a serving process freezes its start-up objects out of garbage collection,
and its engine loop times every collection that runs while it serves."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from engine.engine_loop import EngineLoop
from engine.gc_pauses import GcPauses, freeze_startup_objects
from engine.step_metrics import StepMetrics


def _collections(metrics: StepMetrics, generation: str) -> float:
    return metrics.registry.get_sample_value("longctx_engine_gc_collections_total", {"generation": generation})


def _pause_seconds(metrics: StepMetrics, generation: str) -> float:
    return metrics.registry.get_sample_value("longctx_engine_gc_pause_seconds_total", {"generation": generation})


def test_each_collection_is_timed_by_generation_until_uninstalled():
    metrics = StepMetrics(CollectorRegistry())
    pauses = GcPauses(metrics)
    pauses.install()
    pauses.install()  # once only: a second install adds no second callback
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert pauses._on_collection not in gc.callbacks
    assert _collections(metrics, "0") >= 1 and _collections(metrics, "2") == 1
    assert _pause_seconds(metrics, "2") > 0
    gc.collect(2)
    assert _collections(metrics, "2") == 1  # uninstalled: no longer counted


def test_freezing_moves_live_objects_out_of_collections():
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 1000  # this test process's modules and their objects
        cycle = [object()]
        cycle.append(cycle)  # made after the freeze: still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()  # this process goes on building and dropping engines


def test_the_engine_loop_times_the_collections_while_it_runs(tiny_engine):
    loop = EngineLoop(tiny_engine, deliver=lambda deltas: None, on_failure=lambda error: None)
    before = _collections(tiny_engine.step_metrics, "2")
    loop.submit("summary").add_done_callback(lambda _: gc.collect(2))  # collected on the loop's thread, running
    loop.submit("stop")
    loop.run()
    assert _collections(tiny_engine.step_metrics, "2") == before + 1
    assert loop.gc_pauses._on_collection not in gc.callbacks  # a stopped loop leaves no callback behind
