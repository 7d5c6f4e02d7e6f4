"""Decode CUDA graphs: the bucket sizes and the persistent block tables (CPU), and replay against
eager steps (GPU only, skipped without CUDA)."""

from __future__ import annotations

import random

import pytest
import torch

from model_shards.cuda_graphs import DeviceBlockTables, bucket_for, graph_batch_sizes


def test_graph_sizes_are_powers_of_two_and_their_midpoints():
    assert graph_batch_sizes(256) == [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(20) == [1, 2, 4, 6, 8, 12, 16, 20]


@pytest.mark.parametrize("max_batch", [1, 7, 64, 256, 300])
def test_every_batch_gets_the_smallest_bucket_that_holds_it(max_batch):
    sizes = graph_batch_sizes(max_batch)
    for batch in range(1, max_batch + 1):
        size = bucket_for(batch, sizes)
        assert size >= batch and size - batch < size / 3  # padded rows: under a third of the graph
        assert not [s for s in sizes if batch <= s < size]
    assert bucket_for(max_batch + 1, sizes) is None


def test_block_tables_copy_only_new_entries_and_reuse_rows():
    tables = DeviceBlockTables(max_rows=3, max_blocks=6, device=torch.device("cpu"))
    assert tables.rows_for(["a", "b"], [[5, 1], [7]]) == [0, 1]
    assert tables.table[:2].tolist() == [[5, 1, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0]]
    tables.table[0, 0] = 99  # only new entries travel: an old one is not rewritten
    assert tables.rows_for(["b", "a"], [[7, 2, 3], [5, 1, 4]]) == [1, 0]
    assert tables.table[:2].tolist() == [[99, 1, 4, 0, 0, 0], [7, 2, 3, 0, 0, 0]]
    tables.release("a")
    assert tables.rows_for(["c"], [[8]]) == [0]  # a's row, rewritten from column 0
    assert tables.table[0, :3].tolist() == [8, 1, 4]


def test_block_tables_refuse_when_full_or_too_long():
    tables = DeviceBlockTables(max_rows=2, max_blocks=2, device=torch.device("cpu"))
    assert tables.rows_for(["a", "b", "c"], [[1], [2], [3]]) is None
    assert tables.rows_for(["a"], [[1, 2, 3]]) is None
    assert tables.rows_for(["a", "b"], [[1], [2]]) == [0, 1]  # nothing was taken by the refusals


# A padded graph row changes the batch of every matmul (cuBLAS may pick another kernel for 6 rows
# than for 5): bf16 activations may then round differently, so logprobs may differ by about one
# bf16 ulp of a logit (~0.4% of its size) and a greedy token may flip only where the top two were
# that close. With no padding the graph runs the eager kernels on the same shapes: equal bits.
PADDED_LOGPROB_TOLERANCE = 0.05


def _greedy_with_logprobs(folder: str, prompts: list[list[int]], max_batch: int):
    from cluster.config import CacheSettings, LongctxConfig, ModelSettings
    from engine.llm_engine import LLMEngine
    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    config = LongctxConfig(model=ModelSettings(path=folder, dtype="bfloat16", device="cuda",
                                               attention_backend="cudnn_triton", cuda_graph_max_batch=max_batch),
                           cache=CacheSettings(block_size=16, num_device_blocks=256))
    engine = LLMEngine(config)
    try:
        assert (engine.executor.worker.decode_graphs is None) == (max_batch == 0)
        outputs = generate(engine, prompts, SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2))
    finally:
        engine.shutdown()
    return [output[0].logprobs for output in outputs]  # per prompt: one SampledToken a step


def _assert_legit_divergence(graph, eager) -> None:
    """Logprobs within the tolerance up to the first different token, which must be a near-tie."""
    for step, (ours, theirs) in enumerate(zip(graph, eager)):
        assert abs(ours.logprob - theirs.logprob) <= PADDED_LOGPROB_TOLERANCE, step
        if ours.token_id != theirs.token_id:
            (_, first), (_, second) = theirs.top_logprobs[:2]
            assert first - second <= 2 * PADDED_LOGPROB_TOLERANCE, (step, first, second)
            return


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_prompts", [6, 5])  # the size-6 graph exactly, then with one padded row
def test_graph_decode_equals_eager_decode(model_folder, num_prompts):
    pytest.importorskip("triton")
    folder = str(model_folder(num_key_value_heads=2, head_dim=64, hidden_size=512))
    prompts = [[random.Random(i).randrange(3, 500) for _ in range(20 + 37 * i)] for i in range(num_prompts)]
    eager = _greedy_with_logprobs(folder, prompts, 0)
    graph = _greedy_with_logprobs(folder, prompts, 8)
    if num_prompts == 6:
        assert [[(t.token_id, t.logprob) for t in row] for row in graph] == \
            [[(t.token_id, t.logprob) for t in row] for row in eager]
        return
    for graph_row, eager_row in zip(graph, eager):
        _assert_legit_divergence(graph_row, eager_row)
