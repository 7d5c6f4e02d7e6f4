"""DeepSeek-V4 prompt logprobs (echo + logprobs, lm-eval's loglikelihood) against transformers'
FULL forward over the prompt: computed from the rows of the prefill chunks the engine runs anyway,
whatever the chunking (chunks that end inside compression windows), a cached prefix (computed
again: its rows are needed) or a preemption. Float32 on the CPU, 1e-4 on logprobs as in
test_deepseek_v4_engine.py: the paged chunks sum in another order than one full forward."""

from __future__ import annotations

import pytest
import torch


from engine.offline import generate
from protocol.sampling_params import SamplingParams

from .test_deepseek_v4_engine import ATOL, BLOCK, random_prompt, v4_engine

TOP_K = 3
SCORE_ONLY = SamplingParams(max_tokens=0, prompt_logprobs=TOP_K)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def full_forward_logprobs(reference, prompt: list[int]) -> torch.Tensor:
    """(P - 1, vocab): row p holds the log-softmax that predicts prompt token p + 1."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt]), use_cache=False).logits[0, :-1]
    return logits.float().log_softmax(-1)


def assert_prompt_logprobs_equal(result, prompt: list[int], expected: torch.Tensor) -> None:
    """Every prompt token after the first: its own id and logprob, then the top-k ids and values."""
    tokens = result.prompt_logprobs
    assert [token.token_id for token in tokens] == prompt[1:]
    own = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([token.logprob for token in tokens], dtype=torch.float32), own,
                               atol=ATOL, rtol=0)
    top_values, top_ids = expected.topk(TOP_K, dim=-1)
    assert [[token_id for token_id, _ in token.top_logprobs] for token in tokens] == top_ids.tolist()
    got_values = torch.tensor([[value for _, value in token.top_logprobs] for token in tokens], dtype=torch.float32)
    torch.testing.assert_close(got_values, top_values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [7, 37, 4096])
def test_prompt_logprobs_equal_the_full_forward_under_any_chunking(v4_dir, reference, budget):
    """Budgets 7 and 37 end chunks inside CSA (4) and HCA (16) compression windows; 4096 is one chunk."""
    prompt = random_prompt(40 + budget, 90)
    result = generate(v4_engine(v4_dir, budget=budget), [prompt], SCORE_ONLY)[0][0]
    assert result.token_ids == [] and result.finish_reason == "length"
    assert_prompt_logprobs_equal(result, prompt, full_forward_logprobs(reference, prompt))


def test_a_cached_prefix_is_computed_again_and_shared_afterwards(v4_dir, reference):
    """A prompt of 5 whole blocks is cached by a first request; a scoring request takes no hit
    (it needs every row), and its blocks then serve a third request as usual."""
    prompt = random_prompt(50, 5 * BLOCK + 3)
    engine = v4_engine(v4_dir, budget=37)
    generate(engine, [prompt], SamplingParams(max_tokens=1))
    scored = generate(engine, [prompt], SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=TOP_K))[0][0]
    assert scored.num_prefix_hit_tokens == 0 and len(scored.token_ids) == 4
    assert_prompt_logprobs_equal(scored, prompt, full_forward_logprobs(reference, prompt))
    again = generate(engine, [prompt], SamplingParams(max_tokens=1))[0][0]
    assert again.num_prefix_hit_tokens == 5 * BLOCK


def test_prompt_logprobs_survive_preemption_beside_other_requests(v4_dir, reference):
    """Three 60-token prompts + 20 outputs under 14 compressed blocks preempt (as in the engine
    tests); a preempted request recomputes its prompt and its logprobs are still each token's once."""
    prompts = [random_prompt(seed, 60) for seed in (61, 62, 63)]
    engine = v4_engine(v4_dir, num_blocks=14, budget=32)
    params = SamplingParams(max_tokens=20, ignore_eos=True, prompt_logprobs=TOP_K)
    results = generate(engine, prompts, params)
    assert engine.scheduler.num_preemptions_total > 0
    for sequences, prompt in zip(results, prompts):
        assert_prompt_logprobs_equal(sequences[0], prompt, full_forward_logprobs(reference, prompt))
