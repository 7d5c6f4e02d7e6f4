"""The batched decode attention (model_shards/deepseek_v4/decode_attention.py): many single-query
segments, each with its own window and compressed keys (contiguous or on pages), in one padded
sink attention equal `sink_attention` run for each query alone; and through the pages, several
requests decoding in one forward pass equal the in-memory model run one request at a time."""

from __future__ import annotations

import pytest
import torch

from model_shards.deepseek_v4 import sink_attention as sink_attention_module
from model_shards.deepseek_v4.decode_attention import decode_attention
from model_shards.deepseek_v4.entries import BlockRows, ContiguousEntries, PagedEntries
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.sink_attention import CompressedKeys, sink_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HEADS, DIM, WINDOW, TOPK, RATE, ROWS_PER_BLOCK = 4, 16, 8, 4, 4, 4
TOLERANCE = 1e-5


def on_pages(rows: torch.Tensor, generator: torch.Generator) -> PagedEntries:
    """rows (E, DIM) written through a random block table into a garbage-filled pool."""
    pool = torch.randn(32, ROWS_PER_BLOCK, DIM, generator=generator)
    table = torch.randperm(32, generator=generator)[:-(-rows.shape[0] // ROWS_PER_BLOCK) + 1]
    return PagedEntries(pool, BlockRows(table, ROWS_PER_BLOCK), 0).append(rows)


def one_query(kind: str, position: int, paged: bool, generator: torch.Generator) -> tuple:
    """A query at `position`: its window keys (as SlidingWindowState.append returns them) and its
    compressed keys of layer kind "sliding", "csa" (top-k of the closed entries) or "hca"."""
    window_keys = torch.randn(min(position, WINDOW - 1) + 1, DIM, generator=generator)
    closed = (position + 1) // RATE
    rows = torch.randn(closed, DIM, generator=generator)
    entries = on_pages(rows, generator) if paged else ContiguousEntries(rows)
    if kind == "sliding":
        return window_keys, None
    if kind == "hca":
        return window_keys, CompressedKeys(ContiguousEntries(entries.read(0, closed)), first_position=position,
                                           rate=RATE)
    selected = torch.randperm(closed, generator=generator)[:min(TOPK, closed)].sort().values[None]  # (1, k)
    return window_keys, CompressedKeys(entries, selected=selected)


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("queries_per_block", [1, 3, 100])
def test_padded_batch_equals_each_query_alone(kind, paged, queries_per_block, monkeypatch):
    """Contexts from the first token (no compressed entry) to past W and top-k; the logits bound
    split the batch into blocks of 1, 3 or all queries."""
    generator = torch.Generator().manual_seed(len(kind) + paged)
    positions = [0, 2, 3, 5, 7, 8, 15, 40, 63]
    keys = [one_query(kind, position, paged, generator) for position in positions]
    q = torch.randn(len(positions), HEADS, DIM, generator=generator)
    sinks = torch.randn(HEADS, generator=generator)
    widest = WINDOW + (64 // RATE if kind == "hca" else TOPK)
    monkeypatch.setitem(sink_attention_module.BLOCK_ELEMENTS, "cpu", queries_per_block * HEADS * widest)

    batched = decode_attention(q, keys, WINDOW, sinks, DIM ** -0.5)

    alone = torch.cat([sink_attention(q[i:i + 1], window_keys, WINDOW, compressed, sinks, DIM ** -0.5)
                       for i, (window_keys, compressed) in enumerate(keys)])
    assert batched.shape == (len(positions), HEADS, DIM)
    torch.testing.assert_close(batched, alone, atol=TOLERANCE, rtol=0)


BLOCK = 16  # the tiny preset's derived block size


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_deepseek_v4_model(tmp_path_factory.mktemp("v4-decode"), "deepseek-v4-tiny", seed=5)
    return DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)


def test_requests_decoding_together_on_pages_equal_the_in_memory_model_one_at_a_time(model):
    """Five requests (prompts of 5 .. 95 tokens, some ending on a block boundary, one whose next
    token closes an HCA window at a block's end) prefill on pages in shuffled blocks, then decode
    three tokens in one forward pass a step; the in-memory model runs each alone."""
    lengths, steps = [16, 47, 63, 95, 5], 3
    pages = PagedKV(PagePool(compressed_layout(model.arch, BLOCK, model.dtype), 40, "cpu"),
                    PagePool(window_layout(model.arch, BLOCK, model.dtype), 40, "cpu"), BLOCK)
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(40, generator=generator).tolist()
    ids = [torch.randint(0, 1000, (length + steps,), generator=generator) for length in lengths]
    tables, alone, slots = [], [], [pages.open_windows.take(model.new_state) for _ in lengths]
    for request, length in enumerate(lengths):
        blocks = -(-(length + steps) // BLOCK)
        tables.append((order[:blocks], order[-blocks:]))  # compressed, window
        order = order[blocks:-blocks]
        alone.append(model.new_state())
        model(ids[request][:length], alone[request])
        paged = pages.load(model.new_state, tables[request], 0, slots[request])
        model(ids[request][:length], paged)
        pages.save(paged, slots[request])
    for step in range(steps):
        states = [pages.load(model.new_state, table, length + step, slot)
                  for table, length, slot in zip(tables, lengths, slots)]
        chunks = [request_ids[length + step:length + step + 1] for request_ids, length in zip(ids, lengths)]
        hidden = model.forward_segments(list(zip(chunks, states)))
        expected = torch.cat([model(chunk, state) for chunk, state in zip(chunks, alone)])
        torch.testing.assert_close(hidden, expected, atol=TOLERANCE, rtol=TOLERANCE)
        for state, slot in zip(states, slots):
            pages.save(state, slot)
