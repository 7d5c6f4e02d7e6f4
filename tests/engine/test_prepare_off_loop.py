"""A request's own work (LLMEngine.prepare_request: tokenize, check, hash its blocks) runs on the
thread that puts it in the engine process (its receiver thread), and the loop only queues the
result: the engine steps on while a burst of long prompts is prepared. Errors still reach the
caller, in order. AsyncEngine keeps preparing on its loop thread (its caller shares the GIL)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from engine.async_engine import AsyncEngine
from engine.engine_loop import EngineLoop
from engine.offline import generate
from kvcache.block_hash import hash_full_blocks
from protocol.sampling_params import InvalidParameterError, SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def test_prepared_then_added_is_the_same_request(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    prompt = list(range(3, 40))
    prepared = engine.prepare_request("r", prompt, PARAMS, cache_salt="tenant")
    assert prepared.token_ids == prompt and prepared.params.eos_token_ids == engine.tokenizer.eos_token_ids
    assert list(prepared.block_hashes) == hash_full_blocks(prompt, engine.block_size, prepared.chain_root)
    assert len(prepared.block_hashes) == len(prompt) // engine.block_size
    assert not engine.has_unfinished_requests()  # preparing queues nothing
    engine.add_prepared(prepared)
    request = engine.scheduler.requests["r"]
    assert request.block_hashes == list(prepared.block_hashes)
    with pytest.raises(InvalidParameterError, match="already running"):
        engine.add_prepared(prepared)


def _recording_prepare(engine, threads: list[str]) -> None:
    prepare = engine.prepare_request

    def recording(*args):
        threads.append(threading.current_thread().name)
        return prepare(*args)

    engine.prepare_request = recording


def test_the_engine_process_s_loop_prepares_on_the_putting_thread(tiny_model_dir, make_engine_for):
    """prepare_on_put (the child's receiver thread puts): the request's work is done before it
    is queued, and the loop thread only adds it; a refusal still resolves on the loop's thread."""
    engine, threads, resolved_on = make_engine_for(tiny_model_dir), [], []
    _recording_prepare(engine, threads)
    loop = EngineLoop(engine, lambda deltas: None, lambda error: None, prepare_on_put=True)
    runner = threading.Thread(target=loop.run, name="engine-loop")
    runner.start()
    futures = []
    for request_id, prompt in [("bad", [10**9]), ("good", "off the loop")]:
        future = concurrent.futures.Future()
        future.add_done_callback(lambda _: resolved_on.append(threading.current_thread().name))
        loop.put("add_request", (request_id, prompt, PARAMS, None), future)
        futures.append(future)
    with pytest.raises(InvalidParameterError) as refused:
        futures[0].result(timeout=10)
    assert futures[1].result(timeout=10) is None
    loop.submit("stop").result(timeout=10)
    runner.join(timeout=10)
    assert threads == ["MainThread", "MainThread"]  # the putter's, never the loop's
    assert refused.value.param == "prompt"
    assert resolved_on == ["engine-loop", "engine-loop"]


def test_async_engine_prepares_on_its_loop_and_serves_the_same_tokens(tiny_model_dir, make_engine_for):
    """Without prepare_on_put (AsyncEngine: its caller shares the process and the GIL) the loop
    thread prepares, as add_request always did; a bad prompt is refused all the same."""
    offline = generate(make_engine_for(tiny_model_dir), ["off the loop"], PARAMS)[0][0]
    engine, threads = AsyncEngine(make_engine_for(tiny_model_dir)), []
    _recording_prepare(engine.engine, threads)

    async def run() -> tuple[list[int], InvalidParameterError]:
        with pytest.raises(InvalidParameterError) as refused:
            async for _ in engine.generate("bad", [10**9], PARAMS):  # an id past the vocabulary
                pass
        tokens = [token async for delta in engine.generate("good", "off the loop", PARAMS) for token in delta.token_ids]
        return tokens, refused.value

    try:
        tokens, refused = asyncio.run(run())
    finally:
        engine.shutdown()
    assert threads == ["longctx-engine", "longctx-engine"]
    assert refused.param == "prompt"
    assert tokens == offline.token_ids
