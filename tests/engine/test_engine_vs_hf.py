"""The whole engine against Hugging Face transformers, and against itself under batching, chunking
and prefix caching. Greedy float32: every comparison is token for token, exact."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from engine.offline import generate
from protocol.sampling_params import SamplingParams

GREEDY_64 = SamplingParams(max_tokens=64, ignore_eos=True)


def hf_greedy(model_dir: str, prompt_ids: list[int], num_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate exactly num_tokens, like ignore_eos
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
            do_sample=False, pad_token_id=0,
        )
    return output[0, len(prompt_ids) :].tolist()


def random_prompt(seed: int, length: int, vocab: int = 500) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_greedy_64_tokens_equal_transformers_generate(model_fixture, request, make_engine_for):
    model_dir = request.getfixturevalue(model_fixture)
    engine = make_engine_for(model_dir)
    prompt = random_prompt(0, 45)
    ours = generate(engine, [prompt], GREEDY_64)[0][0].token_ids
    assert ours == hf_greedy(model_dir, prompt, 64)


@pytest.mark.parametrize("budget", [1, 7, 64, 4096])
def test_chunked_prefill_equals_unchunked(tiny_model_dir, budget, make_engine_for):
    prompt = random_prompt(1, 150)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    reference = generate(make_engine_for(tiny_model_dir, budget=4096), [prompt], params)[0][0]
    chunked = generate(make_engine_for(tiny_model_dir, budget=budget), [prompt], params)[0][0]
    assert chunked.token_ids == reference.token_ids
    for ours, theirs in zip(chunked.logprobs, reference.logprobs):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)  # float32 reduction order


def test_mixed_batch_gives_what_each_request_gives_alone(tiny_model_dir, make_engine_for):
    prompts = [random_prompt(seed, length) for seed, length in ((2, 5), (3, 90), (4, 33), (5, 1))]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 3, 17, 9)]
    alone = [generate(make_engine_for(tiny_model_dir), [p], q)[0][0].token_ids for p, q in zip(prompts, params)]
    batched = generate(make_engine_for(tiny_model_dir, budget=40), prompts, params)
    assert [sequences[0].token_ids for sequences in batched] == alone


def test_prefix_cache_hit_gives_what_a_miss_gives(tiny_model_dir, make_engine_for):
    document = random_prompt(6, 97)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    miss = generate(make_engine_for(tiny_model_dir, prefix_caching=False), [document], params)[0][0]
    engine = make_engine_for(tiny_model_dir)
    first = generate(engine, [document], params)[0][0]
    second = generate(engine, [document], params)[0][0]
    assert first.num_prefix_hit_tokens == 0
    assert second.num_prefix_hit_tokens == 96  # 24 full blocks of 4; the last token is recomputed
    assert first.token_ids == second.token_ids == miss.token_ids


def test_preemption_under_memory_pressure_keeps_outputs(tiny_model_dir, make_engine_for):
    prompts = [random_prompt(seed, 30) for seed in range(7, 11)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    roomy = generate(make_engine_for(tiny_model_dir), prompts, params)
    tight_engine = make_engine_for(tiny_model_dir, num_blocks=40)  # 4 x 60 tokens need 60 blocks
    tight = generate(tight_engine, prompts, params)
    assert [s[0].token_ids for s in tight] == [s[0].token_ids for s in roomy]
    assert tight_engine.scheduler.num_preemptions_total > 0
    assert tight_engine.kv_cache.num_free_blocks == 40
