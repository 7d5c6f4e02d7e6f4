"""An idle AsyncEngine given a request gathers the ones still arriving (`arrival_gap_s`): a burst
that reaches it a few ms apart is prefilled in one step, as if it had come at once, and every
stream's tokens and text stay what they are alone. Off (0), the first step starts at the first."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.offline import generate
from protocol.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["A burst of requests", "arrives a few ms apart", "from clients answered together"]


def _new_requests_per_step(engine: AsyncEngine) -> list[list[str]]:
    """The ids each step admits (spied on the scheduler, in the engine thread)."""
    steps: list[list[str]] = []
    scheduler = engine.engine.scheduler
    schedule = scheduler.schedule

    def recorded():
        step_input = schedule()
        if step_input.new_requests:
            steps.append([new.request_id for new in step_input.new_requests])
        return step_input

    scheduler.schedule = recorded
    return steps


def _burst(engine: AsyncEngine, spacing_s: float) -> list[list]:
    """PROMPTS sent `spacing_s` apart to an idle engine; each stream's deltas."""

    async def one(index: int, prompt: str) -> list:
        await asyncio.sleep(index * spacing_s)
        return [delta async for delta in engine.generate(f"burst-{index}", prompt, PARAMS)]

    async def all_of_them():
        return await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(PROMPTS)))

    return asyncio.run(all_of_them())


def test_a_burst_reaching_an_idle_engine_is_prefilled_in_one_step(tiny_model_dir, make_engine_for):
    alone = [generate(make_engine_for(tiny_model_dir), [prompt], PARAMS)[0][0] for prompt in PROMPTS]
    engine = AsyncEngine(make_engine_for(tiny_model_dir), arrival_gap_s=0.5, arrival_max_wait_s=5.0)
    steps = _new_requests_per_step(engine)
    try:
        streams = _burst(engine, spacing_s=0.02)
    finally:
        engine.shutdown()
    assert steps == [["burst-0", "burst-1", "burst-2"]]
    for deltas, expected in zip(streams, alone):
        assert [token for delta in deltas for token in delta.token_ids] == expected.token_ids
        assert "".join(delta.text for delta in deltas) == expected.text
        assert [delta.finish_reason for delta in deltas] == [None] * 5 + ["length"]


@pytest.mark.parametrize("gathering", [{}, {"arrival_gap_s": 0.5, "arrival_max_wait_s": 0.05}],
                         ids=["no gap: the first request starts alone", "the wait is bounded by arrival_max_wait_s"])
def test_the_first_step_does_not_wait_for_requests_0_2_s_apart(tiny_model_dir, make_engine_for, gathering):
    """Without a gap the engine never waits; with one, requests that keep coming within it do not
    hold the first step past the bound."""
    engine = AsyncEngine(make_engine_for(tiny_model_dir), **gathering)
    steps = _new_requests_per_step(engine)
    try:
        _burst(engine, spacing_s=0.2)
    finally:
        engine.shutdown()
    assert steps[0] == ["burst-0"]
    assert sorted(id_ for step in steps for id_ in step) == ["burst-0", "burst-1", "burst-2"]
