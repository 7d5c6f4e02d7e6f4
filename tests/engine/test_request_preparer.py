"""A request's own work (engine/request_preparer.py: tokenize, check, hash its blocks) yields
the request the engine adds, crosses a pipe as bytes, and refuses ids outside the vocabulary.
AsyncEngine prepares on its loop thread; ProcessEngine in the replica (tests/engine/test_engine_process.py)."""

from __future__ import annotations

from array import array

import asyncio
import dataclasses
import pickle
import threading

import pytest

from engine.async_engine import AsyncEngine
from engine.offline import generate
from engine.request_preparer import RequestPreparer
from kvcache.block_hash import hash_full_blocks
from protocol.sampling_params import InvalidParameterError, SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def test_prepared_then_added_is_the_same_request(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)
    prompt = list(range(3, 40))
    prepared = engine.prepare_request("r", prompt, PARAMS, cache_salt="tenant")
    assert list(prepared.token_ids) == prompt and prepared.params.eos_token_ids == engine.tokenizer.eos_token_ids
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


def test_a_prepared_request_crosses_a_pipe_as_its_uint32_encoding(tiny_model_dir, make_engine_for):
    """Pickled as bytes (~4 bytes a token), not as a list of ints (5 bytes a token above 65,535,
    and ~1 ms of the receiving interpreter's GIL per 33K tokens to rebuild)."""
    engine = make_engine_for(tiny_model_dir)
    limits = dataclasses.replace(engine.preparer.limits, vocab_size=2**31, max_model_len=10**6, num_kv_blocks=10**6,
                                 block_size=1024)  # 19 hashes: the pickle is the tokens
    preparer = RequestPreparer(engine.tokenizer, limits)
    prompt = [70_000 + 7 * index for index in range(20_000)]
    prepared = preparer.prepare("r", prompt, PARAMS, cache_salt="tenant")
    pickled = pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(pickled) < 4 * len(prompt) + 4096
    copy = pickle.loads(pickled)
    # an int64 array on both sides (protocol/token_ids.py): nothing for the collector to walk
    assert copy == prepared and list(copy.token_ids) == prompt
    assert isinstance(copy.token_ids, array) and copy.token_ids.typecode == "q"
    assert copy.block_hashes == prepared.block_hashes and copy.params == prepared.params


@pytest.mark.parametrize("prompt", [[5, -1], [5, 2**33], [5, 2.5], [5, "6"]], ids=["negative", "past-u32", "float", "text"])
def test_token_ids_that_are_no_vocabulary_ids_are_refused_as_the_prompt_s(prompt, tiny_engine):
    with pytest.raises(InvalidParameterError, match=r"token ids must be in \[0, ") as refused:
        tiny_engine.prepare_request("r", prompt, PARAMS)
    assert refused.value.param == "prompt"
    vocab_size = tiny_engine.architecture.vocab_size
    with pytest.raises(InvalidParameterError, match="token ids must be in"):
        tiny_engine.prepare_request("r", [5, vocab_size], PARAMS)
    assert tiny_engine.prepare_request("r", [5, vocab_size - 1], PARAMS).token_ids.tolist() == [5, vocab_size - 1]


def test_async_engine_prepares_on_its_loop_and_serves_the_same_tokens(tiny_model_dir, make_engine_for):
    """AsyncEngine's caller shares the process and the GIL: the loop thread prepares, as
    add_request always did (on the caller's thread it convoyed the step, session 14); a bad
    prompt is refused all the same."""
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
