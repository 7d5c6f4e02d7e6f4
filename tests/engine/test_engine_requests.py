"""Request handling in the engine: bad input, stops, n > 1, seeds, aborts, streaming."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from engine.async_engine import AsyncEngine
from engine.llm_engine import ContextLengthExceededError
from engine.offline import generate
from engine.scheduler import QueueFullError
from protocol.sampling_params import InvalidParameterError, SamplingParams


def test_empty_prompt_is_rejected(tiny_engine):
    for empty in ("", []):
        with pytest.raises(InvalidParameterError) as error:
            tiny_engine.add_request("empty", empty, SamplingParams())
        assert error.value.param == "prompt"


def test_prompt_longer_than_the_context_is_rejected(tiny_engine):
    too_long = [5] * tiny_engine.max_model_len
    with pytest.raises(ContextLengthExceededError) as error:
        tiny_engine.add_request("long", too_long, SamplingParams())
    assert error.value.code == "context_length_exceeded"
    assert not tiny_engine.has_unfinished_requests()


def test_prompt_that_cannot_fit_the_kv_cache_is_rejected(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir, num_blocks=4)  # 16 tokens of KV
    with pytest.raises(ContextLengthExceededError, match="KV cache"):
        engine.add_request("big", [5] * 10, SamplingParams(max_tokens=10))


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", -3), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
     ("top_k", -1), ("min_p", 2.0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
     ("frequency_penalty", -2.5), ("n", 0), ("logprobs", 21)],
)
def test_out_of_range_sampling_values_name_the_parameter(field, value):
    with pytest.raises(InvalidParameterError) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field


def test_token_ids_outside_the_vocabulary_are_rejected(tiny_engine):
    with pytest.raises(InvalidParameterError, match="token ids"):
        tiny_engine.add_request("oov", [1, 10**7], SamplingParams())


def test_stop_string_ends_the_text_before_it(tiny_engine):
    free_run = generate(tiny_engine, ["The contract says"], SamplingParams(max_tokens=40, ignore_eos=True))[0][0]
    stop = free_run.text[10:13]  # a piece of the greedy text, wherever the tokens split it
    stopped = generate(tiny_engine, ["The contract says"], SamplingParams(max_tokens=40, stop=(stop,)))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free_run.text[: free_run.text.index(stop)]
    assert free_run.token_ids[: len(stopped.token_ids)] == stopped.token_ids


def test_stop_token_id_finishes_with_stop(tiny_engine):
    free_run = generate(tiny_engine, ["Hello"], SamplingParams(max_tokens=10, ignore_eos=True))[0][0]
    stop_token = free_run.token_ids[4]
    first_index = free_run.token_ids.index(stop_token)
    result = generate(tiny_engine, ["Hello"], SamplingParams(max_tokens=10, stop_token_ids=(stop_token,)))[0][0]
    assert result.finish_reason == "stop"
    assert result.token_ids == free_run.token_ids[: first_index + 1]


def test_n_sequences_with_a_seed_are_reproducible_and_distinct(tiny_engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42, n=3, ignore_eos=True)
    first = [s.token_ids for s in generate(tiny_engine, ["Once upon"], params)[0]]
    second = [s.token_ids for s in generate(tiny_engine, ["Once upon"], params)[0]]
    assert first == second
    assert len({tuple(tokens) for tokens in first}) == 3


def test_a_group_that_does_not_fit_the_queue_leaves_nothing_behind(tiny_model_dir, make_engine_for):
    engine = make_engine_for(tiny_model_dir)  # the scheduler queues at most 1,024 sequences
    engine.add_request("earlier", "x", SamplingParams(max_tokens=2, n=1000))
    with pytest.raises(QueueFullError):  # 24 of these 100 would fit: none may be queued
        engine.add_request("group", "Hello there", SamplingParams(max_tokens=64, n=100, ignore_eos=True))
    assert engine.stats().num_waiting == 1000 and "group" not in engine._request_groups
    with pytest.raises(InvalidParameterError) as error:  # could never fit: a 400, not a 429
        engine.add_request("huge", "Hello there", SamplingParams(n=2000))
    assert error.value.param == "n" and engine.stats().num_waiting == 1000
    engine.abort_request("earlier")
    engine.add_request("group", "Hello there", SamplingParams(max_tokens=2, n=100))  # the same id is free
    assert engine.stats().num_waiting == 100


def test_abort_frees_blocks_at_once(tiny_engine):
    total = tiny_engine.kv_cache.num_free_blocks
    tiny_engine.add_request("to-abort", [7] * 40, SamplingParams(max_tokens=50))
    tiny_engine.step()
    assert tiny_engine.kv_cache.num_free_blocks < total
    deltas = tiny_engine.abort_request("to-abort")
    assert [d.finish_reason for d in deltas] == ["abort"]
    assert tiny_engine.kv_cache.num_free_blocks == total
    assert not tiny_engine.has_unfinished_requests()


def test_async_stream_concatenates_to_the_offline_result(tiny_model_dir, make_engine_for):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    offline = generate(make_engine_for(tiny_model_dir), ["Streaming works"], params)[0][0]
    engine = AsyncEngine(make_engine_for(tiny_model_dir))

    async def collect():
        return [delta async for delta in engine.generate("s1", "Streaming works", params)]

    try:
        deltas = asyncio.run(collect())
    finally:
        engine.shutdown()
    assert "".join(d.text for d in deltas) == offline.text
    assert [t for d in deltas for t in d.token_ids] == offline.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"


def test_async_stream_closed_early_aborts_the_request(tiny_model_dir, make_engine_for):
    engine = AsyncEngine(make_engine_for(tiny_model_dir))
    total = engine.engine.kv_cache.num_free_blocks

    async def read_two_then_leave():
        stream = engine.generate("leaver", "A long answer", SamplingParams(max_tokens=500, ignore_eos=True))
        async for delta in stream:
            if delta.num_output_tokens >= 2:
                break
        await stream.aclose()
        for _ in range(100):  # the abort runs on the engine thread before its next step
            if engine.engine.kv_cache.num_free_blocks == total:
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(read_two_then_leave())
    finally:
        engine.shutdown()


def test_cli_generate_json_contract(tiny_model_dir):
    command = [sys.executable, "-m", "cluster.cli", "generate", "--model", tiny_model_dir,
               "--prompt", "Hello there", "--max-tokens", "5", "--json"]
    output = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert set(output) >= {"text", "token_ids", "usage", "timing", "kv"}
    assert output["usage"]["completion_tokens"] == len(output["token_ids"]) <= 5
    assert set(output["timing"]) >= {"ttft_s", "tpot_s"}
    assert set(output["kv"]) >= {"block_size", "blocks_used", "prefix_hit_tokens"}
    assert output["kv"]["blocks_used"] >= 1


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    cases = [
        ["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"],
        ["generate", "--model", tiny_model_dir, "--prompt", "x", "--max-tokens", "-1"],
        ["generate", "--model", tiny_model_dir, "--prompt", ""],
    ]
    # Side by side: each case is seconds of interpreter start-up (torch), and they share nothing.
    processes = [subprocess.Popen([sys.executable, "-m", "cluster.cli", *arguments], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for arguments in cases]  # fmt: skip
    for arguments, process in zip(cases, processes):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (arguments, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("longctx: error:"), (arguments, stderr)
