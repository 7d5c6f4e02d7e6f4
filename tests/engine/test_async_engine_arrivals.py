"""An idle AsyncEngine given a request while requests come together gathers the ones still
arriving (`arrival_gap_s`): a burst that reaches it a few ms apart is prefilled in one step, as if
it had come at once, and every stream's tokens and text stay what they are alone. A lone request
after a quiet period, or one client's requests one after another, start at once. Off (0), the
first step never waits."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from engine.async_engine import AsyncEngine
from engine.offline import generate
from protocol.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["A burst of requests", "arrives a few ms apart", "from clients answered together"]
GAP_S = 0.5  # far longer than any step of the tiny model: a wait for it shows


def _new_requests_per_step(engine: AsyncEngine) -> list[tuple[float, list[str]]]:
    """(monotonic time, the ids admitted) of each step that admits some (spied on the scheduler,
    in the engine thread)."""
    steps: list[tuple[float, list[str]]] = []
    scheduler = engine.engine.scheduler
    schedule = scheduler.schedule

    def recorded():
        step_input = schedule()
        if step_input.new_requests:
            steps.append((time.monotonic(), [new.request_id for new in step_input.new_requests]))
        return step_input

    scheduler.schedule = recorded
    return steps


def _ids(steps: list[tuple[float, list[str]]]) -> list[list[str]]:
    return [ids for _, ids in steps]


async def _requests_open_together(engine: AsyncEngine) -> None:
    """Two requests whose streams are open at once (the second is added while the first's stream
    waits to be read), both read to the end: the engine has just served requests together."""
    first = engine.generate("together-0", PROMPTS[0], PARAMS)
    async with aclosing(first):
        await anext(first)
        [delta async for delta in engine.generate("together-1", PROMPTS[1], PARAMS)]
        [delta async for delta in first]


async def _burst(engine: AsyncEngine, spacing_s: float) -> list[list]:
    """PROMPTS sent `spacing_s` apart; each stream's deltas."""

    async def one(index: int, prompt: str) -> list:
        await asyncio.sleep(index * spacing_s)
        return [delta async for delta in engine.generate(f"burst-{index}", prompt, PARAMS)]

    return await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(PROMPTS)))


def _burst_after_requests_together(engine: AsyncEngine, spacing_s: float) -> list[list]:
    """Clients answered together asking again: `_burst` right after `_requests_open_together`."""

    async def both():
        await _requests_open_together(engine)
        return await _burst(engine, spacing_s)

    return asyncio.run(both())


def _burst_steps(steps: list[tuple[float, list[str]]]) -> list[list[str]]:
    """The steps admitting the burst's requests."""
    return [ids for ids in _ids(steps) if ids[0].startswith("burst-")]


def test_a_burst_after_requests_together_is_prefilled_in_one_step(tiny_model_dir, make_engine_for):
    alone = [generate(make_engine_for(tiny_model_dir), [prompt], PARAMS)[0][0] for prompt in PROMPTS]
    engine = AsyncEngine(make_engine_for(tiny_model_dir), arrival_gap_s=GAP_S, arrival_max_wait_s=5.0)
    steps = _new_requests_per_step(engine)
    try:
        streams = _burst_after_requests_together(engine, spacing_s=0.02)
    finally:
        engine.shutdown()
    assert _burst_steps(steps) == [["burst-0", "burst-1", "burst-2"]]
    for deltas, expected in zip(streams, alone):
        assert [token for delta in deltas for token in delta.token_ids] == expected.token_ids
        assert "".join(delta.text for delta in deltas) == expected.text
        assert [delta.finish_reason for delta in deltas] == [None] * 5 + ["length"]


def test_a_lone_request_on_a_quiet_engine_starts_at_once(tiny_model_dir, make_engine_for):
    """One client's requests one after another, on a fresh engine: each one's first step starts
    well within the gap of its sending (a tenth of it; waiting would take all of it)."""
    engine = AsyncEngine(make_engine_for(tiny_model_dir), arrival_gap_s=GAP_S, arrival_max_wait_s=5.0)
    steps = _new_requests_per_step(engine)

    async def one_after_another() -> list[float]:
        sent = []
        for index, prompt in enumerate(PROMPTS):
            sent.append(time.monotonic())
            [delta async for delta in engine.generate(f"lone-{index}", prompt, PARAMS)]
        return sent

    try:
        sent = asyncio.run(one_after_another())
    finally:
        engine.shutdown()
    assert _ids(steps) == [["lone-0"], ["lone-1"], ["lone-2"]]
    delays_s = [started - at for (started, _), at in zip(steps, sent)]
    assert all(0 <= delay_s < GAP_S / 10 for delay_s in delays_s), delays_s


def _slow_burst_steps(engine: AsyncEngine) -> list[list[str]]:
    """The burst's new requests a step, its requests sent 0.2 s apart after requests open together."""
    steps = _new_requests_per_step(engine)
    try:
        _burst_after_requests_together(engine, spacing_s=0.2)
    finally:
        engine.shutdown()
    return _burst_steps(steps)


def test_the_wait_is_bounded_by_arrival_max_wait_s(tiny_model_dir, make_engine_for):
    """Requests 0.2 s apart keep coming within the gap, yet the first burst step starts at the
    bound (0.25 s): the third, sent at 0.4 s, is not in it."""
    engine = AsyncEngine(make_engine_for(tiny_model_dir), arrival_gap_s=GAP_S, arrival_max_wait_s=0.25)
    burst_steps = _slow_burst_steps(engine)
    assert burst_steps[0][0] == "burst-0" and "burst-2" not in burst_steps[0]
    assert sorted(id_ for ids in burst_steps for id_ in ids) == ["burst-0", "burst-1", "burst-2"]


@pytest.mark.parametrize("gathering", [{}, {"arrival_gap_s": 0.0, "arrival_max_wait_s": 5.0}],
                         ids=["the engine's default", "gap 0"])
def test_without_a_gap_the_first_request_of_a_burst_starts_alone(tiny_model_dir, make_engine_for, gathering):
    burst_steps = _slow_burst_steps(AsyncEngine(make_engine_for(tiny_model_dir), **gathering))
    assert burst_steps[0] == ["burst-0"]
    assert sorted(id_ for ids in burst_steps for id_ in ids) == ["burst-0", "burst-1", "burst-2"]


def test_a_gap_set_on_a_running_engine_takes_effect(tiny_model_dir, make_engine_for):
    """set_arrival_gap (bench/serve_load.py --arrival-gap-ab A/Bs one engine): an engine made
    without a gap gathers the next burst once given one; a negative gap is refused."""
    engine = AsyncEngine(make_engine_for(tiny_model_dir), arrival_gap_s=0.0, arrival_max_wait_s=5.0)
    with pytest.raises(ValueError):
        engine.set_arrival_gap(-0.001)
    engine.set_arrival_gap(GAP_S)
    steps = _new_requests_per_step(engine)
    try:
        _burst_after_requests_together(engine, spacing_s=0.02)
    finally:
        engine.shutdown()
    assert _burst_steps(steps) == [["burst-0", "burst-1", "burst-2"]]
