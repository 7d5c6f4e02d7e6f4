"""DeepSeek-V4 through the whole engine on its paged hybrid KV cache (compressed + window block
groups of the KV-cache coordinator), against transformers' FULL forward over the final sequence.

The reference is one `use_cache=False` forward over prompt + our greedy output: its argmax at
every generated position must be our token, and its log-softmax our token's logprob (1e-4,
float32). The tiny preset has window 8, CSA every 4 tokens (top-4 indexer), HCA every 16, so the
derived block size is 16: prompts of 100-200 tokens cross 12-25 windows and 6-12 blocks.
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster.config import CacheSettings, ConfigError, LongctxConfig, ModelSettings, SchedulerSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from protocol.sampling_params import SamplingParams

ATOL = 1e-4
BLOCK = 16  # lcm of the tiny preset's compress rates 4 and 16
NULL = -1  # a window block that left the window
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def v4_engine(model_dir: str, *, budget: int = 4096, num_blocks: int | None = None, block_size: int | None = None,
              max_num_seqs: int = 8, prefix_caching: bool = True) -> LLMEngine:
    return LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="float32", device="cpu"),
        cache=CacheSettings(block_size=block_size, num_device_blocks=num_blocks, cpu_kv_bytes=8 << 20,
                            enable_prefix_caching=prefix_caching),
        scheduler=SchedulerSettings(max_tokens_per_step=budget, max_tokens_per_step_while_decoding=budget,
                                    max_num_seqs=max_num_seqs)))


def random_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(length)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)


def assert_equals_full_forward(reference, prompt: list[int], result) -> None:
    """Every generated token is the full forward's argmax there, with its log-softmax."""
    sequence = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        logits = reference(sequence, use_cache=False).logits[0, len(prompt) - 1:-1]  # (generated, vocab)
    assert result.token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in result.logprobs]), expected, atol=ATOL, rtol=0)


def test_long_prompt_equals_the_full_forward_and_reports_the_derived_block_size(v4_dir, reference):
    engine = v4_engine(v4_dir)
    assert engine.block_size == BLOCK and engine.kv_cache.block_size == BLOCK
    prompt = random_prompt(0, 200)
    result = generate(engine, [prompt], greedy(12))[0][0]
    assert_equals_full_forward(reference, prompt, result)
    assert len(set(result.token_ids)) > 3


@pytest.mark.parametrize("budget", [7, 13, 37])
def test_chunked_prefill_with_odd_budgets_equals_the_full_forward(v4_dir, reference, budget):
    prompt = random_prompt(budget, 150)
    result = generate(v4_engine(v4_dir, budget=budget), [prompt], greedy(8))[0][0]
    assert_equals_full_forward(reference, prompt, result)


def test_prefix_hit_ending_inside_a_compression_window_is_served_to_the_last_block_boundary(v4_dir, reference):
    """The shared prefix is 45 tokens: inside CSA window 11 and HCA window 2. The hit stops at
    the last block boundary (32 tokens); the rest is recomputed, exactly."""
    engine = v4_engine(v4_dir)
    first = random_prompt(1, 70)
    second = first[:45] + random_prompt(2, 40)
    generate(engine, [first], greedy(2))
    result = generate(engine, [second], greedy(10))[0][0]
    assert result.num_prefix_hit_tokens == 32
    assert_equals_full_forward(reference, second, result)


def test_prefix_hit_at_a_block_boundary_is_read_from_the_pages(v4_dir, reference):
    """Sharing 96 tokens (6 blocks): 96 tokens come from the compressed and window pages (the
    overlap state of the CSA compressors included), 41 are computed."""
    engine = v4_engine(v4_dir)
    first = random_prompt(3, 110)
    second = first[:96] + random_prompt(4, 41)
    generate(engine, [first], greedy(3))
    result = generate(engine, [second], greedy(10))[0][0]
    assert (result.num_prefix_hit_tokens, result.num_prompt_tokens - result.num_prefix_hit_tokens) == (96, 41)
    assert_equals_full_forward(reference, second, result)


def test_the_same_prompt_twice_hits_all_but_its_last_block(v4_dir, reference):
    engine = v4_engine(v4_dir)
    prompt = random_prompt(5, 64)  # 4 blocks exactly: the last token is always computed
    once = generate(engine, [prompt], greedy(6))[0][0]
    twice = generate(engine, [prompt], greedy(6))[0][0]
    assert (once.num_prefix_hit_tokens, twice.num_prefix_hit_tokens) == (0, 48)
    assert twice.token_ids == once.token_ids
    assert_equals_full_forward(reference, prompt, twice)


def test_preemption_under_a_tiny_block_budget_keeps_outputs_exact(v4_dir, reference):
    """Three requests of 60-70 + 20 tokens need 6 compressed blocks each; 14 blocks preempt."""
    engine = v4_engine(v4_dir, num_blocks=14, budget=32)
    prompts = [random_prompt(10 + i, 60 + 5 * i) for i in range(3)]
    results = generate(engine, prompts, greedy(20))
    assert engine.scheduler.num_preemptions_total > 0
    for prompt, [result] in zip(prompts, results):
        assert_equals_full_forward(reference, prompt, result)


def test_concurrent_requests_each_equal_the_full_forward(v4_dir, reference):
    engine = v4_engine(v4_dir, budget=48)
    prompts = [random_prompt(20 + i, length) for i, length in enumerate((17, 90, 33, 128))]
    results = generate(engine, prompts, greedy(9))
    for prompt, [result] in zip(prompts, results):
        assert_equals_full_forward(reference, prompt, result)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks  # all freed (cached blocks count free)


def test_a_block_size_that_splits_a_compression_window_is_refused(v4_dir):
    with pytest.raises(ConfigError, match="cache.block_size 24 must be a multiple of 16"):
        v4_engine(v4_dir, block_size=24)


def test_block_tables_of_both_groups_through_a_prefill_and_a_hit(v4_dir):
    """Exact block ids: the compressed group keeps every block; the window group (7 tokens) keeps
    the blocks a chunk starting at the next token reads. b's hit of 32 tokens shares a's two
    compressed blocks and a's window block 1 (the 7 tokens before 32)."""
    engine = v4_engine(v4_dir, budget=32)
    a = random_prompt(30, 70)
    engine.add_request("a", a, greedy(4))
    engine.step()
    assert engine.kv_cache.block_tables("a") == ((0, 1), (NULL, 1))
    engine.step()
    assert engine.kv_cache.block_tables("a") == ((0, 1, 2, 3), (NULL, NULL, NULL, 3))
    engine.add_request("b", a[:40] + random_prompt(31, 8), greedy(4))
    engine.step()  # a's last 6 tokens; b: a hit of 2 blocks, then its last 16 tokens
    assert engine.kv_cache.block_tables("a") == ((0, 1, 2, 3, 4), (NULL, NULL, NULL, 3, 4))
    assert engine.kv_cache.block_tables("b") == ((0, 1, 5), (NULL, NULL, 5))
    assert engine.scheduler.requests["b"].num_prefix_hit_tokens == 32
