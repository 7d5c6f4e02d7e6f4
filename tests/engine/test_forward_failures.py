"""A forward pass that raises (a CUDA out-of-memory on a long chunk, a kernel error) fails the
request(s) whose own chunk fails, not the engine: the others get their tokens exactly as if the
culprit had never been there, its blocks are freed, and the engine serves the next request
(model_shards/step_containment.py). The injected failure runs the real forward first, so the
failed attempt has written its KV, pages and open windows: the retry must rewrite, not append."""

from __future__ import annotations

import random
import re

import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.offline import generate
from protocol.sampling_params import SamplingParams
from tests.engine.test_deepseek_v4_engine import v4_engine
from model_shards.deepseek_v4.presets import make_deepseek_v4_model

POISON = 1000  # a token id only the culprit's prompt holds (both tiny vocabularies are 1024)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 999) for _ in range(length)]


OTHERS = {"first": _prompt(1, 21), "second": _prompt(2, 37), "third": _prompt(3, 9)}  # decodes inside V4 blocks
POISON_AT = 150
CULPRIT = _prompt(4, POISON_AT) + [POISON] + _prompt(5, 30)  # prefilled in chunks: a later one holds the poison
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _out_of_memory_after(forward, holds_poison):
    """`forward`, which raises CUDA's out-of-memory error after it ran whenever a chunk holds POISON."""
    def wrapped(*args):
        output = forward(*args)
        if holds_poison(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return output
    return wrapped


def _poison_dense(engine: LLMEngine) -> None:
    model = engine.executor.worker.model
    model.forward = _out_of_memory_after(model.forward, lambda input_ids, *_: bool((input_ids == POISON).any()))


def _poison_v4(engine: LLMEngine) -> None:
    model = engine.executor.worker.model
    model.forward_segments = _out_of_memory_after(
        model.forward_segments, lambda segments, *_: any(bool((ids == POISON).any()) for ids, _ in segments))


def _run(engine: LLMEngine, culprit_after_steps: int) -> dict:
    """Token ids of each of OTHERS, and the culprit's error, the culprit added after some steps."""
    for request_id, prompt in OTHERS.items():
        engine.add_request(request_id, prompt, GREEDY)
    deltas = []
    for _ in range(culprit_after_steps):
        deltas += engine.step()
    engine.add_request("culprit", CULPRIT, GREEDY)
    while engine.has_unfinished_requests():
        deltas += engine.step()
    outcome = {rid: [t for d in deltas if d.request_id == rid for t in d.token_ids] for rid in OTHERS}
    return {**outcome, "culprit": [d.error for d in deltas if d.request_id == "culprit" and d.finished]}


def _assert_contained(engine: LLMEngine, reference: dict, culprit_after_steps: int) -> None:
    outcome = _run(engine, culprit_after_steps)
    (error,) = outcome.pop("culprit")
    count, start = map(int, re.search(r"out of GPU memory in its (\d+)-token chunk at position (\d+): "
                                      r"OutOfMemoryError: CUDA out of memory", error).groups())
    assert 0 < start <= POISON_AT < start + count  # the chunk that holds the poison, its earlier ones done
    assert outcome == reference
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    (after,) = generate(engine, [OTHERS["second"]], GREEDY)[0]
    assert after.error is None and after.token_ids == reference["second"]


@pytest.mark.parametrize("culprit_after_steps", [0, 2], ids=["among-prefills", "beside-decodes"])
def test_an_out_of_memory_chunk_fails_its_llama_request_alone(tiny_model_dir, make_engine_for, culprit_after_steps):
    reference = {rid: generate(make_engine_for(tiny_model_dir, budget=64), [prompt], GREEDY)[0][0].token_ids
                 for rid, prompt in OTHERS.items()}
    engine = make_engine_for(tiny_model_dir, budget=64, block_size=16)
    _poison_dense(engine)
    _assert_contained(engine, reference, culprit_after_steps)


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory) -> str:
    return str(make_deepseek_v4_model(tmp_path_factory.mktemp("v4-failures"), "deepseek-v4-tiny", seed=3))


@pytest.mark.parametrize("culprit_after_steps", [0, 2], ids=["among-prefills", "beside-decodes"])
def test_an_out_of_memory_chunk_fails_its_deepseek_v4_request_alone(v4_dir, culprit_after_steps):
    reference = {rid: generate(v4_engine(v4_dir, budget=64), [prompt], GREEDY)[0][0].token_ids
                 for rid, prompt in OTHERS.items()}
    engine = v4_engine(v4_dir, budget=64)
    _poison_v4(engine)
    _assert_contained(engine, reference, culprit_after_steps)


def test_a_failed_v4_step_of_decodes_alone_fails_only_those_closing_an_overlapping_window(v4_dir):
    """Such a step keeps no copy of the open windows (contained_chunks.py): a decode that closes a
    CSA window (rate 4: position 23) swapped its slot's overlap half and fails with the step; one
    that does not (position 21) is retried and ends exactly as undisturbed."""
    closing, other = _prompt(6, 23), _prompt(7, 21)  # their first decodes at positions 23 and 21
    (reference,) = generate(v4_engine(v4_dir), [other], GREEDY)[0]
    engine = v4_engine(v4_dir)
    model = engine.executor.worker.model
    forward, calls = model.forward_segments, []

    def first_decode_step_fails(segments, *rest):
        calls.append([ids.shape[0] for ids, _ in segments])
        output = forward(segments, *rest)  # runs whole first: the slots' windows are written
        if calls[-1] == [1, 1] and calls.count([1, 1]) == 1:
            raise RuntimeError("injected kernel failure")
        return output

    model.forward_segments = first_decode_step_fails
    (failed,), (retried,) = generate(engine, [closing, other], GREEDY)
    assert calls[:3] == [[23, 21], [1, 1], [1]]  # prefills, the failed decodes, the other one alone
    assert failed.error.endswith("its forward pass failed in its 1-token chunk at position 23: RuntimeError: "
                                 "injected kernel failure (a step of decodes alone keeps no copy of its open "
                                 "windows to retry from)")
    assert len(failed.token_ids) == 1  # from its prefill
    assert retried.error is None and retried.token_ids == reference.token_ids
