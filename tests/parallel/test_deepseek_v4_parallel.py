"""DeepSeek-V4 with tensor parallelism over attention and indexer heads and expert parallelism
for the MoE (gloo, 2 ranks) gives one rank's logits.

On 2 ranks each holds 2 of 4 query heads, 1 of 2 output groups, 8 of 16 indexer heads, 2 of 4
experts, half the shared expert and half the vocabulary; the K = V head, the compressors and so
the whole cache state are replicated. 1e-4 absolute on logits (float32): ranks only reorder sums
(three all-reduces a layer, the indexer's head sum among them), ~1e-6; a wrong head, group or
expert moves logits by O(1), and a differing top-k choice on one rank by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_v4_jobs import run_deepseek_v4_chunks
from model_shards.rank import RankContext
from model_shards.deepseek_v4.presets import make_deepseek_v4_model

TOLERANCE = 1e-4
# prefill 37 tokens in odd chunks, decode 6; resume from the state after 2 chunks (13 tokens:
# inside a CSA window and an HCA window)
CHUNKS = [6, 7, 11, 13, 1, 1, 1, 1, 1, 1]


@pytest.fixture(scope="session")
def v4_tiny_folder(tmp_path_factory):
    return make_deepseek_v4_model(tmp_path_factory.mktemp("v4-tp"), "deepseek-v4-tiny", seed=7)


def test_tp2_ep2_logits_and_state_equal_one_rank(world2, v4_tiny_folder):
    token_ids = torch.randint(0, 1000, (sum(CHUNKS),), generator=torch.Generator().manual_seed(8)).tolist()
    args = (v4_tiny_folder, token_ids, CHUNKS, 2)
    single, single_state = run_deepseek_v4_chunks(RankContext(0, 1, torch.device("cpu")), args[0], 1, *args[1:])
    per_rank = world2.call(run_deepseek_v4_chunks, args[0], 2, *args[1:])
    assert single.shape == (sum(CHUNKS) + sum(CHUNKS[2:]), 1024)
    for logits, state in per_rank:
        assert (logits - single).abs().max().item() <= TOLERANCE
        torch.testing.assert_close(state, single_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(single[-sum(CHUNKS[2:]):], single[13:sum(CHUNKS)], atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_tp2_engine_on_the_paged_cache_equals_one_rank(world2, v4_tiny_folder):
    """The whole engine with 2 rank processes: each rank keeps its own replica of both page pools
    (the state is replicated under TP); greedy tokens, logprobs, a prefix hit and prompt logprobs
    (the vocabulary-split logits of every prompt row, a collective) equal one rank's."""
    from cluster.config import CacheSettings, LongctxConfig, ModelSettings, ParallelSettings, SchedulerSettings
    from engine.llm_engine import LLMEngine
    from engine.offline import generate
    from executors.local import LocalProcessExecutor
    from protocol.sampling_params import SamplingParams

    def config(tp: int) -> LongctxConfig:
        return LongctxConfig(model=ModelSettings(path=str(v4_tiny_folder), dtype="float32", device="cpu"),
                             cache=CacheSettings(cpu_kv_bytes=8 << 20), parallel=ParallelSettings(tensor_parallel_size=tp),
                             scheduler=SchedulerSettings(max_tokens_per_step=24, max_num_seqs=4))

    def workload(engine: LLMEngine):
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)
        prompts = [[(7 * i + 3) % 1000 for i in range(70)], [(11 * i + 5) % 1000 for i in range(19)]]
        batch = generate(engine, prompts, params)
        repeat = generate(engine, [prompts[0]], params)[0][0]
        scored = generate(engine, [prompts[0]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0][0]
        return [r[0] for r in batch] + [repeat, scored]

    one = workload(LLMEngine(config(1)))
    executor = LocalProcessExecutor(config(2), processes=world2)
    try:
        two = workload(LLMEngine(config(2), executor=executor))
    finally:
        executor.shutdown()
    assert two[2].num_prefix_hit_tokens == one[2].num_prefix_hit_tokens == 64
    scored_two, scored_one = two.pop(), one.pop()
    assert [t.token_id for t in scored_two.prompt_logprobs] == [t.token_id for t in scored_one.prompt_logprobs]
    assert len(scored_two.prompt_logprobs) == 69
    assert torch.allclose(torch.tensor([t.logprob for t in scored_two.prompt_logprobs]),
                          torch.tensor([t.logprob for t in scored_one.prompt_logprobs]), atol=TOLERANCE, rtol=0)
    for ours, theirs in zip(two, one):
        assert ours.token_ids == theirs.token_ids
        assert torch.allclose(torch.tensor([t.logprob for t in ours.logprobs]),
                              torch.tensor([t.logprob for t in theirs.logprobs]), atol=TOLERANCE, rtol=0)


def _split_chunks_equal_one_rank(processes, folder, tp: int, sp: int) -> None:
    """Every chunk of >= 8 tokens split over the SP ranks (4 tokens a rank at least), pieces that
    end inside CSA and HCA windows; each rank keeps a replica of the state. Three concurrent
    requests (chunks beside decodes), then a prefix hit: greedy tokens and logprobs equal one rank's."""
    from cluster.config import CacheSettings, LongctxConfig, ModelSettings, ParallelSettings, SchedulerSettings
    from engine.llm_engine import LLMEngine
    from engine.offline import generate
    from executors.local import LocalProcessExecutor
    from protocol.sampling_params import SamplingParams

    def config(tp: int, sp: int) -> LongctxConfig:
        return LongctxConfig(model=ModelSettings(path=str(folder), dtype="float32", device="cpu"),
                             cache=CacheSettings(cpu_kv_bytes=8 << 20),
                             parallel=ParallelSettings(tensor_parallel_size=tp, sequence_parallel_size=sp,
                                                       sequence_split_min_tokens=4),
                             scheduler=SchedulerSettings(max_tokens_per_step=46, max_num_seqs=4))

    def workload(engine: LLMEngine):
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
        prompts = [[(7 * i + 3) % 1000 for i in range(70)], [(11 * i + 5) % 1000 for i in range(37)],
                   [(13 * i + 1) % 1000 for i in range(9)]]
        batch = generate(engine, prompts, params)
        repeat = generate(engine, [prompts[0][:64] + prompts[1][:30]], params)[0][0]
        return [r[0] for r in batch] + [repeat]

    one = workload(LLMEngine(config(1, 1)))
    executor = LocalProcessExecutor(config(tp, sp), processes=processes)
    try:
        split = workload(LLMEngine(config(tp, sp), executor=executor))
    finally:
        executor.shutdown()
    assert split[3].num_prefix_hit_tokens == one[3].num_prefix_hit_tokens == 64
    for ours, theirs in zip(split, one):
        assert ours.token_ids == theirs.token_ids
        assert torch.allclose(torch.tensor([t.logprob for t in ours.logprobs]),
                              torch.tensor([t.logprob for t in theirs.logprobs]), atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_sp2_engine_splits_prefill_chunks_and_equals_one_rank(world2, v4_tiny_folder):
    """Sequence parallelism (model_shards/deepseek_v4/sequence_split.py) on 2 ranks."""
    _split_chunks_equal_one_rank(world2, v4_tiny_folder, tp=1, sp=2)


@pytest.mark.slow
def test_tp2_sp2_engine_equals_one_rank(world4, v4_tiny_folder):
    """Both at once (4 ranks): the split's all-gather runs in the SP groups, heads and experts in the
    TP groups, and only SP rank 0's TP group computes logits."""
    _split_chunks_equal_one_rank(world4, v4_tiny_folder, tp=2, sp=2)
