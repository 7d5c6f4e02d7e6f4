"""Compressor entries read where they lie (model_shards/deepseek_v4/entries.py): on pages through
a random block table, every read the attention and the indexer make equals the same read of one
contiguous tensor, exactly (the same values reach the same arithmetic). The score kernel runs in
Triton's interpreter on a CPU."""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4.entries import BlockRows, ContiguousEntries, PagedEntries, row_starts
from model_shards.deepseek_v4.kv_pages import PagePool, PageLayout
from model_shards.deepseek_v4.index_scores import index_scores, index_scores_triton
from model_shards.deepseek_v4.sink_attention import CompressedKeys, sink_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS_PER_BLOCK, DIM = 4, 16
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the kernel: compiled, or interpreted
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16  # the interpreter has no bf16 dots


def paged_copy(rows: torch.Tensor, num_blocks: int = 40, seed: int = 0) -> PagedEntries:
    """`rows` (E, DIM) written through a random block table into a pool of garbage-filled blocks,
    whose field sits between other bytes of each block (as a page field does)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(num_blocks, ROWS_PER_BLOCK + 3, DIM + 5, generator=generator).to(rows.device, rows.dtype)
    view = pool[:, 1:1 + ROWS_PER_BLOCK, 2:2 + DIM]  # (num_blocks, rows_per_block, DIM), strided
    blocks_needed = -(-rows.shape[0] // ROWS_PER_BLOCK) + 2  # room to append
    table = torch.randperm(num_blocks, generator=generator)[:blocks_needed].to(rows.device)
    return PagedEntries(view, BlockRows(table, ROWS_PER_BLOCK), 0).append(rows)


def test_paged_reads_gathers_and_appends_equal_the_contiguous_tensor():
    rows = torch.randn(13, DIM)
    paged, contiguous = paged_copy(rows), ContiguousEntries(rows)
    assert paged.count == contiguous.count == 13 and paged.nbytes == contiguous.nbytes
    for first, stop in ((0, 13), (3, 9), (4, 8), (12, 13), (5, 5)):
        assert torch.equal(paged.read(first, stop), contiguous.read(first, stop))
    index = torch.tensor([[12, 0, 5], [4, 4, 3]])
    assert torch.equal(paged.gather(index), rows[index])
    more = torch.randn(6, DIM)
    grown, grown_contiguous = paged.append(more), contiguous.append(more)
    assert grown.count == 19 and torch.equal(grown.read(0, 19), grown_contiguous.rows)
    assert torch.equal(grown.head(10).read(0, 10), rows[:10])


@pytest.mark.parametrize("seed", range(4))
def test_top_k_gather_by_address_from_a_page_pool_is_bit_equal_to_the_contiguous_gather(seed):
    """CSA's gather (PagedEntries.gather: one address op, one index_select) from a real page pool,
    whose field sits between other fields of each block (block stride not a multiple of the row),
    through a random block table: the same bits as indexing one contiguous tensor."""
    generator = torch.Generator().manual_seed(seed)
    rows_per_block, width, count = 8, 24, 8 * 11 - 3
    layout = PageLayout([(0, "before", 3, 5, torch.float32), (0, "entries", rows_per_block, width, torch.bfloat16),
                         (1, "after", 2, 9, torch.bfloat16)])
    pool = PagePool(layout, 16, "cpu")
    pool.data.random_(0, 256, generator=generator)  # garbage everywhere else
    view = pool.view(0, "entries")
    assert view.stride(0) % view.stride(1) != 0  # rows of different blocks lie off one row grid
    table = torch.randperm(16, generator=generator)[:11]
    rows = torch.randn(count, width, generator=generator).to(torch.bfloat16)
    paged = PagedEntries(view, BlockRows(table, rows_per_block), 0).append(rows)
    index = torch.randint(0, count, (13, 7), generator=generator)
    gathered = paged.gather(index)
    assert gathered.shape == (13, 7, width) and gathered.is_contiguous()
    assert torch.equal(gathered.view(torch.int16), ContiguousEntries(rows).gather(index).view(torch.int16))


def test_row_starts_address_every_row_of_a_strided_view_without_a_copy():
    pool = torch.arange(5 * 7 * 21).view(5, 7, 21)
    view = pool[:, 1:5, 2:18]  # (5 blocks, 4 rows, 16 wide), block stride 147, row stride 21
    starts, block_step, row_step = row_starts(view)
    assert starts.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    for block, row in ((0, 0), (3, 2), (4, 3)):
        assert torch.equal(starts[block * block_step + row * row_step], view[block, row])
    with pytest.raises(ValueError, match="contiguous"):
        row_starts(pool[:, :, ::2])


@pytest.mark.parametrize("tokens, entries, first_position", [(37, 21, 60), (5, 30, 117), (20, 3, 0)])
@pytest.mark.parametrize("ranked", [False, True])
def test_score_kernel_through_a_block_table_equals_contiguous_keys(tokens, entries, first_position, ranked):
    """Keys scattered over blocks in random order, tiles of 16 entries crossing 4-row blocks."""
    generator = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, 4, DIM, generator=generator).to(DEVICE, HALF)
    weights = torch.randn(tokens, 4, generator=generator).to(DEVICE) * 0.1
    keys = torch.randn(entries, DIM, generator=generator).to(DEVICE, HALF)
    tiles = dict(block_tokens=16, block_entries=16, ranked=ranked)
    contiguous = index_scores_triton(q, weights, keys, first_position, 4, **tiles)
    paged = index_scores_triton(q, weights, paged_copy(keys, seed=entries), first_position, 4, **tiles)
    assert torch.equal(paged, contiguous)
    assert (contiguous > 0).any() if not ranked else contiguous.unique().numel() > entries


def test_torch_scores_and_attention_read_pages_like_a_tensor():
    """The CPU path: indexer scores, then CSA attention over each query's selected entries."""
    generator = torch.Generator().manual_seed(3)
    tokens, heads, window = 9, 2, 4
    keys = torch.randn(11, DIM, generator=generator)
    paged = paged_copy(keys, seed=7)
    q = torch.randn(tokens, heads, DIM, generator=generator)
    weights = torch.randn(tokens, heads, generator=generator)
    first = 40  # queries at 40 .. 48 see entries (p + 1) // 4 = 10 .. 12, i.e. all 11 from position 43
    assert torch.equal(index_scores(q, weights, paged.head(10), first, 4),
                       index_scores(q, weights, ContiguousEntries(keys[:10]), first, 4))
    selected = torch.randint(-1, 11, (tokens, 5), generator=generator)
    window_keys = torch.randn(window - 1 + tokens, DIM, generator=generator)
    sinks = torch.randn(heads, generator=generator)

    def attend(entries):
        return sink_attention(q, window_keys, window, CompressedKeys(entries, selected=selected), sinks, 0.25)

    assert torch.equal(attend(paged), attend(ContiguousEntries(keys)))
