"""AsyncEngine hands deltas to a stream's loop without waking it for every step: a paced stream
(`stream_chunks_per_s`) sleeps between its lists, and the deltas made meanwhile wait in its inbox
until it takes them all at once. Every delta still arrives, in order."""

from __future__ import annotations

import asyncio
import threading

from engine.async_engine import AsyncEngine
from engine.offline import generate
from protocol.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)


def _engine_thread_wakeups(loop: asyncio.AbstractEventLoop) -> list:
    """The callbacks the engine thread schedules on `loop` (each one a cross-thread wake-up)."""
    calls = []
    schedule = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        if threading.current_thread().name == "longctx-engine":
            calls.append(callback)
        return schedule(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted
    return calls


def _stream_lists(engine: AsyncEngine, request_id: str) -> tuple[list[list], list]:
    loop = asyncio.new_event_loop()
    wakeups = _engine_thread_wakeups(loop)

    async def collect():
        return [deltas async for deltas in engine.stream(request_id, "Paced streams sleep", PARAMS)]

    try:
        return loop.run_until_complete(collect()), wakeups
    finally:
        loop.close()


def test_a_paced_stream_is_woken_once_per_list_not_once_per_step(tiny_model_dir, make_engine_for):
    offline = generate(make_engine_for(tiny_model_dir), ["Paced streams sleep"], PARAMS)[0][0]
    engine = AsyncEngine(make_engine_for(tiny_model_dir), stream_chunks_per_s=10)  # one list per 100 ms
    try:
        lists, wakeups = _stream_lists(engine, "paced")
    finally:
        engine.shutdown()
    deltas = [delta for batch in lists for delta in batch]
    assert [token for delta in deltas for token in delta.token_ids] == offline.token_ids
    assert "".join(delta.text for delta in deltas) == offline.text
    assert len(deltas) == 40 and deltas[-1].finish_reason == "length"
    assert len(lists) < 10  # tokens grouped: 40 steps in a few lists
    # One wake-up for add_request's answer, at most one per list after that (not one per step).
    assert len(wakeups) <= _most_wakeups(lists)


def test_an_unpaced_stream_gets_every_step_s_delta_as_its_own_list(tiny_model_dir, make_engine_for):
    engine = AsyncEngine(make_engine_for(tiny_model_dir))
    try:
        lists, wakeups = _stream_lists(engine, "unpaced")
    finally:
        engine.shutdown()
    assert sum(len(batch) for batch in lists) == 40
    assert len(lists) >= 20  # a waiting stream is woken as each step ends
    assert len(wakeups) <= _most_wakeups(lists)


def _most_wakeups(lists: list) -> int:
    """One for add_request's answer and one per list, plus a few spurious ones: a delta put
    between the stream setting its waiter and looking at its inbox again is taken without a wait,
    and the engine thread, which saw the waiter, still wakes the loop (session 21's clean-clone
    run counted 41 wake-ups for 39 lists). Waking once per delta or twice per list still fails."""
    return len(lists) + 1 + max(1, len(lists) // 10)
