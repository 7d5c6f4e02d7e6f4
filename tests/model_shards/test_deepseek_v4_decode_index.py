"""A decode step's Lightning Indexer in one pass: N requests' single queries scored into one
(N, E_max) block (-inf past each E_i) and one top-k, against each request scored and ranked
alone as before. Entry counts mix none, fewer than, exactly and more than top-k; entries lie in
contiguous tensors or on one page pool through each request's block table. The kernel runs
compiled on a GPU, in Triton's interpreter on a CPU (float16 there: it has no bf16 dots).
"""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.entries import BlockRows, ContiguousEntries, PagedEntries
from model_shards.deepseek_v4.index_scores import (decode_index_scores, decode_index_scores_triton,
                                                   index_scores_torch, index_scores_triton, ranking_keys)
from model_shards.deepseek_v4.indexer import IndexerInputs, LightningIndexer, top_k_of_ranking
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.presets import make_deepseek_v4_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
HEADS, DIM, RATE, TOP_K, ROWS_PER_BLOCK = 4, 16, 4, 8, 4
COUNTS = [3, 0, 8, 21, 40, 8, 1, 33]  # entries per request: < top-k, none, = top-k, > top-k


def request_keys(counts: list[int], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(count, DIM, generator=generator).to(DEVICE, dtype) for count in counts]


def on_one_pool(rows: list[torch.Tensor], seed: int = 1) -> list[PagedEntries]:
    """Each request's rows on its own shuffled blocks of one garbage-filled pool whose field sits
    between other bytes of each block (as a page field does)."""
    generator = torch.Generator().manual_seed(seed)
    needs = [-(-part.shape[0] // ROWS_PER_BLOCK) + 1 for part in rows]
    pool = torch.randn(sum(needs) + 3, ROWS_PER_BLOCK + 2, DIM + 3, generator=generator).to(DEVICE, rows[0].dtype)
    view = pool[:, 1:1 + ROWS_PER_BLOCK, 2:2 + DIM]  # (blocks, rows_per_block, DIM), strided
    blocks = torch.randperm(pool.shape[0], generator=generator).to(DEVICE).split(needs + [3])
    return [PagedEntries(view, BlockRows(table, ROWS_PER_BLOCK), 0).append(part) for part, table in zip(rows, blocks)]


def entries_of(rows: list[torch.Tensor], paged: bool):
    return on_one_pool(rows) if paged else [ContiguousEntries(part) for part in rows]


def queries(count: int, dtype: torch.dtype, seed: int = 2, ties: bool = False):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(count, HEADS, DIM, generator=generator).to(DEVICE, dtype)
    weights = torch.randn(count, HEADS, generator=generator).to(DEVICE) * 0.1
    if ties:  # weights 1, 0, -1: many exact 0 (and -0.0) scores, ties broken by entry order
        weights = (weights > 0).float() - (weights < -0.15).float()
    return q, weights


def one_by_one(q, weights, keys, scorer) -> list[torch.Tensor]:
    """Today's per-request selection: each decode scored at its position, ranked, top-k'd alone."""
    chosen = []
    for row, entries in enumerate(keys):
        position = entries.count * RATE + RATE - 1  # a decode that sees exactly its entries
        scores = scorer(q[row:row + 1], weights[row:row + 1], entries, position)
        chosen.append(top_k_of_ranking(ranking_keys(scores), min(TOP_K, entries.count)))
    return chosen


def all_at_once(q, weights, keys, scorer=decode_index_scores) -> list[torch.Tensor]:
    ranked = scorer(q, weights, keys, ranked=True, block_entries=16)
    chosen = top_k_of_ranking(ranked, min(TOP_K, ranked.shape[1]))
    return [chosen[row:row + 1, :min(TOP_K, entries.count)] for row, entries in enumerate(keys)]


def torch_scorer(q, weights, entries, position):
    return index_scores_torch(q, weights, entries.read(0, entries.count), position, RATE)


def kernel_scorer(q, weights, entries, position):
    return index_scores_triton(q, weights, entries, position, RATE, block_tokens=16, block_entries=16)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_one_pass_float32_selects_as_one_request_at_a_time(paged, ties):
    q, weights = queries(len(COUNTS), torch.float32, ties=ties)
    keys = entries_of(request_keys(COUNTS, torch.float32), paged)
    for expected, got in zip(one_by_one(q, weights, keys, torch_scorer), all_at_once(q, weights, keys), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_one_kernel_launch_selects_as_the_per_request_kernel(paged, ties):
    q, weights = queries(len(COUNTS), HALF, ties=ties)
    keys = entries_of(request_keys(COUNTS, HALF), paged)
    for expected, got in zip(one_by_one(q, weights, keys, kernel_scorer),
                             all_at_once(q, weights, keys, decode_index_scores_triton), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("paged", [False, True])
def test_kernel_scores_equal_the_reference_and_pad_with_minus_infinity(paged):
    q, weights = queries(len(COUNTS), HALF)
    keys = entries_of(request_keys(COUNTS, HALF), paged)
    scores = decode_index_scores_triton(q, weights, keys, block_entries=16)
    assert scores.shape == (len(COUNTS), max(COUNTS))
    for row, entries in enumerate(keys):
        expected = torch_scorer(q[row:row + 1], weights[row:row + 1], entries, entries.count * RATE)[0]
        torch.testing.assert_close(scores[row, :entries.count], expected, atol=1e-5, rtol=1e-5)
        assert (scores[row, entries.count:] == float("-inf")).all()
    assert scores[scores > float("-inf")].abs().max() > 0.1


@pytest.fixture(scope="module")
def indexer(tmp_path_factory) -> LightningIndexer:
    folder = make_deepseek_v4_model(tmp_path_factory.mktemp("v4-decode-index"), "deepseek-v4-tiny", seed=4)
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    return next(module for module in model.modules() if isinstance(module, LightningIndexer))


def test_indexer_chooses_decodes_together_as_one_by_one(indexer):
    """The model's indexer (top-4, 16 heads of 16): its batched choice against its per-request _top_k."""
    counts = [0, 2, 4, 5, 30, 4, 17]
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(len(counts), indexer.num_heads, indexer.head_dim, generator=generator)
    weights = torch.randn(len(counts), indexer.num_heads, generator=generator)
    keys = [ContiguousEntries(torch.randn(count, indexer.head_dim, generator=generator)) for count in counts]
    inputs = [IndexerInputs(q[row:row + 1], weights[row:row + 1], q[:0], q[:0]) for row in range(len(counts))]
    together = indexer._choose_decodes(keys, inputs)
    for row, entries in enumerate(keys):
        position = entries.count * indexer.rate + indexer.rate - 1
        alone = indexer._top_k(q[row:row + 1], weights[row:row + 1], entries, position)
        assert together[row].shape == (1, min(indexer.topk, entries.count))
        assert torch.equal(together[row], alone)
