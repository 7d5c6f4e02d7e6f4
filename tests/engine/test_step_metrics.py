"""The engine's step and loop series (engine/step_metrics.py): each step is counted under its kind
with the tokens it computed, and the loop's wall time is split by activity."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.async_engine import AsyncEngine
from engine.step_metrics import step_kind
from protocol.sampling_params import SamplingParams


def _samples(registry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the registry's exposition."""
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip


def _value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_step_kind_names_what_the_step_computed():
    assert step_kind(512, 0) == "prefill"
    assert step_kind(0, 7) == "decode"
    assert step_kind(256, 3) == "mixed"


def test_steps_are_counted_by_kind_with_their_tokens(tiny_model_dir, make_engine_for):
    # Budget 8 with 4-token blocks: a 20-token prompt takes 3 chunks (8, 8, 4); its first output
    # token comes with the last chunk, then 5 decode steps make the other 5. A second request added
    # after the first's prefill decodes beside the first one's: its chunks make mixed steps.
    engine = make_engine_for(tiny_model_dir, budget=8)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine.add_request("first", list(range(1, 21)), params)
    for _ in range(3):
        engine.step()
    samples = _samples(engine.step_metrics.registry)
    assert _value(samples, "longctx_engine_steps_total", kind="prefill") == 3
    assert _value(samples, "longctx_engine_step_tokens_total", phase="prompt") == 20
    assert _value(samples, "longctx_engine_step_tokens_total", phase="output") == 0
    engine.add_request("second", list(range(30, 42)), params)  # 12 tokens: chunks of 7 and 5 beside a decode
    while engine.has_unfinished_requests():
        engine.step()
    samples = _samples(engine.step_metrics.registry)
    steps = {kind: _value(samples, "longctx_engine_steps_total", kind=kind) for kind in ("prefill", "decode", "mixed")}
    assert steps == {"prefill": 3, "mixed": 2, "decode": 5}
    assert _value(samples, "longctx_engine_step_tokens_total", phase="prompt") == 32
    # Outputs computed as inputs: each request's 6 tokens but the last, which is sampled and never fed back.
    assert _value(samples, "longctx_engine_step_tokens_total", phase="output") == 10
    assert _value(samples, "longctx_engine_step_duration_seconds_count") == 10
    step_seconds = sum(_value(samples, "longctx_engine_step_seconds_total", kind=kind) for kind in steps)
    phase_seconds = sum(_value(samples, "longctx_engine_step_phase_seconds_total", phase=phase)
                        for phase in ("schedule", "execute", "outputs"))  # fmt: skip
    assert step_seconds > 0 and abs(step_seconds - phase_seconds) < 1e-9


def test_the_loop_splits_its_time_by_activity(tiny_model_dir, make_engine_for):
    engine = AsyncEngine(make_engine_for(tiny_model_dir))

    async def run() -> None:
        async for _ in engine.generate("r", "the loop's time", SamplingParams(max_tokens=8, ignore_eos=True)):
            pass
        await asyncio.sleep(0.05)  # the loop blocks for a command: idle

    try:
        asyncio.run(run())
        samples = _samples(engine.engine.step_metrics.registry)
    finally:
        engine.shutdown()
    loop = {activity: _value(samples, "longctx_engine_loop_seconds_total", activity=activity)
            for activity in ("step", "publish", "commands", "gather", "idle")}  # fmt: skip
    assert loop["step"] > 0 and loop["publish"] > 0 and loop["commands"] > 0 and loop["idle"] > 0
    assert loop["gather"] == 0  # serve.arrival_gap_s is 0: a burst is never waited for
    step_seconds = sum(_value(samples, "longctx_engine_step_seconds_total", kind=kind)
                       for kind in ("prefill", "decode", "mixed"))  # fmt: skip
    assert loop["step"] >= step_seconds  # the loop's step time holds the steps' own


def test_a_metrics_read_while_the_loop_waits_counts_the_wait_up_to_the_read(tiny_model_dir, make_engine_for):
    """The loop polls its commands every IDLE_POLL_S (0.5 s); reading the metrics in between counts
    the wait so far, so that two reads 0.2 s apart on an idle engine differ by 0.2 s of idle, not
    0 (or a whole poll's worth that began before the first read: a bench window's false idle)."""
    engine = AsyncEngine(make_engine_for(tiny_model_dir))

    def idle_seconds() -> float:
        return _value(_samples_of(engine), "longctx_engine_loop_seconds_total", activity="idle")

    try:
        time.sleep(0.1)  # the loop is waiting for a command now
        first = idle_seconds()
        time.sleep(0.2)
        second = idle_seconds()
    finally:
        engine.shutdown()
    assert 0.18 <= second - first <= 0.3, (first, second)


def _samples_of(engine: AsyncEngine) -> dict[tuple[str, tuple], float]:
    """The engine's exposition as the bench reads it (AsyncEngine.metrics_exposition), parsed."""
    text = asyncio.run(engine.metrics_exposition())
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip
