"""Prompt logprobs (echo + logprobs, lm-eval's loglikelihood) against transformers' own forward
pass: computed in the prefill chunks the engine runs anyway, whatever the chunking, the prefix
cache or a preemption."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.offline import generate
from protocol.sampling_params import InvalidParameterError, SamplingParams

from .test_engine_vs_hf import random_prompt

SCORE_ONLY = SamplingParams(max_tokens=0, prompt_logprobs=3)


@pytest.fixture(scope="module")
def hf_prompt_logprobs(tiny_model_dir):
    """(prompt) -> (P - 1, vocab) logprobs of prompt tokens 1..P-1 from transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    def logprobs(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, :-1].float()  # row p predicts token p + 1
        return logits.log_softmax(dim=-1)

    return logprobs


def _assert_matches(result, prompt, reference, top_k=3):
    assert [token.token_id for token in result.prompt_logprobs] == prompt[1:]
    expected = reference.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    assert [token.logprob for token in result.prompt_logprobs] == pytest.approx(expected.tolist(), abs=1e-4)
    top_values, top_ids = reference.topk(top_k, dim=-1)
    for token, ids, values in zip(result.prompt_logprobs, top_ids.tolist(), top_values.tolist()):
        assert [token_id for token_id, _ in token.top_logprobs] == ids
        assert [value for _, value in token.top_logprobs] == pytest.approx(values, abs=1e-4)


@pytest.mark.parametrize("budget", [5, 64, 4096])
def test_prompt_logprobs_equal_transformers_under_any_chunking(tiny_model_dir, make_engine_for, hf_prompt_logprobs,
                                                               budget):  # fmt: skip
    prompt = random_prompt(11, 70)
    result = generate(make_engine_for(tiny_model_dir, budget=budget), [prompt], SCORE_ONLY)[0][0]
    assert result.token_ids == [] and result.finish_reason == "length"
    _assert_matches(result, prompt, hf_prompt_logprobs(prompt))


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(tiny_model_dir, make_engine_for, hf_prompt_logprobs):
    prompt = random_prompt(12, 50)
    engine = make_engine_for(tiny_model_dir)
    generate(engine, [prompt], SamplingParams(max_tokens=1))  # now its 12 full blocks are cached
    result = generate(engine, [prompt], SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=3))[0][0]
    assert result.num_prefix_hit_tokens == 0
    assert len(result.token_ids) == 4
    _assert_matches(result, prompt, hf_prompt_logprobs(prompt))
    again = generate(engine, [prompt], SamplingParams(max_tokens=1))[0][0]
    assert again.num_prefix_hit_tokens == 48  # the scored request's blocks are shared afterwards


def test_prompt_logprobs_survive_preemption_and_batching(tiny_model_dir, make_engine_for, hf_prompt_logprobs):
    prompts = [random_prompt(seed, 30) for seed in range(20, 24)]
    params = SamplingParams(max_tokens=30, ignore_eos=True, prompt_logprobs=3)
    engine = make_engine_for(tiny_model_dir, num_blocks=40, budget=16)  # 4 x 60 tokens need 60 blocks: preempts
    results = generate(engine, prompts, params)
    assert engine.scheduler.num_preemptions_total > 0
    for sequences, prompt in zip(results, prompts):
        _assert_matches(sequences[0], prompt, hf_prompt_logprobs(prompt))


def test_max_tokens_zero_and_prompt_logprobs_ranges():
    assert SamplingParams(max_tokens=0).max_tokens == 0
    with pytest.raises(InvalidParameterError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
