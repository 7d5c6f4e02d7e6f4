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
    pauses = GcPauses(metrics.observe_gc)
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
        assert frozen > 1000  # this test process's modules and their objects
        # A frozen object that dies (here, or on pytest-xdist's execnet thread) leaves the permanent
        # generation, so the count may only have shrunk since, and by a handful.
        assert 0 <= frozen - gc.get_freeze_count() < frozen // 100
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


def _visits(holder) -> int:
    """The objects a collection visits through `holder` (its type, for an array)."""
    return len(gc.get_referents(holder))


def test_a_request_holds_its_token_ids_where_the_collector_does_not_walk(tiny_model_dir, make_engine_for):
    """Every long-lived holder of a prompt's ids (the prepared request, the scheduler's request,
    the worker's state) keeps them in an int64 array, whose ids are no objects for gc to visit: a
    list of 33K ids costs every collection of its generation 33K visits (protocol/token_ids.py)."""
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    engine = make_engine_for(tiny_model_dir)
    prompt = list(range(3, 300))
    prepared = engine.prepare_request("tracked", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    assert _visits(prepared.token_ids) <= 1 and prepared.token_ids.tolist() == prompt
    engine.add_prepared(prepared)
    engine.step()
    request = next(iter(engine.scheduler.requests.values()), None)
    worker_state = engine.executor.worker.requests.get(request.request_id) if request else None
    holders = [request.prompt_token_ids, request.token_ids] if request else []
    holders += [worker_state.token_ids] if worker_state else []
    assert len(holders) == 3 and all(_visits(holder) <= 1 for holder in holders)  # its type at most
    assert _visits(prompt) == len(prompt)  # what a list costs each collection
    deltas = [delta for _ in range(8) for delta in engine.step()]
    assert [token for delta in deltas for token in delta.token_ids] and deltas[-1].finish_reason == "length"
    assert generate(engine, [prompt], SamplingParams(max_tokens=2))[0][0].finish_reason == "length"
