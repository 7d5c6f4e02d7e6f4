"""A request's own work (LLMEngine.prepare_request: tokenize, check, hash its blocks) runs on the
caller's thread, not the engine loop's, and the loop only queues the result: the engine steps on
while a burst of long prompts is prepared. Errors still reach the caller, in order."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.async_engine import AsyncEngine
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


def test_a_request_is_prepared_on_the_caller_s_thread(tiny_model_dir, make_engine_for):
    offline = generate(make_engine_for(tiny_model_dir), ["off the loop"], PARAMS)[0][0]
    engine = AsyncEngine(make_engine_for(tiny_model_dir))
    threads = []
    prepare = engine.engine.prepare_request

    def recording(*args):
        threads.append(threading.current_thread().name)
        return prepare(*args)

    engine.engine.prepare_request = recording

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
    assert threads == ["MainThread", "MainThread"]  # the caller's: never "longctx-engine"
    assert refused.param == "prompt"
    assert tokens == offline.token_ids
