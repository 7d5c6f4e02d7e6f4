"""A static decode step (static_decodes.py: N padded to a batch bucket, every window pooled, entries
read up to a context bucket, one packed input buffer, one persistent block table) equals today's
dynamic step (paged_decodes.DecodeBatch) bit for bit on a CPU in float32: the real rows' hidden
states and logits, the window and compressed pages and every real slot's open windows, over
several steps in which windows close for some rows and not others (CSA, HCA, a block's end).
Its layers dispatch the same ops whatever N within a bucket and whatever the context."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from model_shards.cuda_graphs import DeviceBlockTables, bucket_for, graph_batch_sizes
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.op_count import OpCounter
from model_shards.deepseek_v4.paged_decodes import DecodeBatch, PagedDecode
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.static_decodes import (DecodeShape, Scratch, StaticDecodeBatch, StaticDecodeInputs,
                                                     StaticDecodeKey, context_bucket)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BLOCK = 16  # the tiny preset's block: CSA windows of 4, HCA windows of 16
NUM_BLOCKS = 64  # the requests' blocks; block NUM_BLOCKS of each pool is the scratch block
MAX_BATCH = 16  # buckets 1, 2, 4, 6, 8, 12, 16
STEPS = 3
TOLERANCE = 1e-5
# contexts whose next tokens close a CSA window (3, 7, 19), a CSA and an HCA window at a block's
# end (15, 31, 47, 63), close none (5, 40, 62, 9)
LENGTHS = [5, 15, 31, 40, 47, 62, 63, 3, 7, 19, 9]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_deepseek_v4_model(tmp_path_factory.mktemp("v4-static-decodes"), "deepseek-v4-tiny", seed=4)
    return DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)


@dataclass
class Request:
    ids: list[int]
    tables: tuple[list[int], list[int]]  # compressed, window
    slot: int


def prefilled(model, lengths: list[int]) -> tuple[PagedKV, list[Request], Scratch]:
    """Pages holding prompts of `lengths` tokens on shuffled blocks, and a scratch slot and blocks."""
    pages = PagedKV(PagePool(compressed_layout(model.arch, BLOCK, model.dtype), NUM_BLOCKS + 1, "cpu"),
                    PagePool(window_layout(model.arch, BLOCK, model.dtype), NUM_BLOCKS + 1, "cpu"), BLOCK)
    pages.open_windows.reserve(MAX_BATCH + 1, model.new_state)  # as decode_graphs.py: slots never move
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    requests = []
    for length in lengths:
        blocks = -(-(length + STEPS) // BLOCK)
        requests.append(Request(torch.randint(0, 1000, (length + STEPS,), generator=generator).tolist(),
                                (order[:blocks], order[-blocks:]), pages.open_windows.take(model.new_state)))
        order = order[blocks:-blocks]
    segments = [(torch.tensor(r.ids[:length]), pages.load(model.new_state, r.tables, 0, r.slot))
                for r, length in zip(requests, lengths)]
    model.forward_segments(segments)
    for request, (_, state) in zip(requests, segments):
        pages.save(state, request.slot)
    return pages, requests, Scratch(pages.open_windows.take(model.new_state), NUM_BLOCKS, NUM_BLOCKS)


def decodes_at(requests: list[Request], positions: list[int]) -> list[PagedDecode]:
    return [PagedDecode(p, r.slot, r.tables, torch.tensor(r.tables[0])) for r, p in zip(requests, positions)]


def dynamic_step(model, pages: PagedKV, requests: list[Request], positions: list[int]) -> torch.Tensor:
    decodes = decodes_at(requests, positions)
    batch = DecodeBatch(pages, model.arch.sliding_window, decodes, None, len(decodes))
    return model.forward_segments([(torch.tensor([r.ids[p]]), None) for r, p in zip(requests, positions)], batch)


class StaticSteps:
    """Static steps of `requests` on `pages`: a persistent table, one input buffer per key."""

    def __init__(self, model, pages: PagedKV, scratch: Scratch):
        self.model, self.pages, self.scratch = model, pages, scratch
        rates = tuple(sorted({field.rows for (_, name), field in pages.open_windows.fields().items()
                              if name.endswith("pending_kv")}))
        self.shape = DecodeShape(model.arch.sliding_window, BLOCK, rates)
        self.tables = DeviceBlockTables(MAX_BATCH, NUM_BLOCKS, torch.device("cpu"), torch.long)

    def inputs(self, requests: list[Request], positions: list[int], exact: bool = False) -> StaticDecodeInputs:
        """exact: a key of the step's own sizes (N rows, entries up to the widest row's) instead of buckets."""
        key = StaticDecodeKey(len(requests), max(positions) + 1) if exact else \
            StaticDecodeKey(bucket_for(len(requests), graph_batch_sizes(MAX_BATCH)), context_bucket(positions, BLOCK))
        inputs = StaticDecodeInputs(key, self.shape, self.scratch, torch.device("cpu"))
        rows = self.tables.rows_for([str(r.slot) for r in requests], [r.tables[0] for r in requests])
        inputs.fill(decodes_at(requests, positions), [r.ids[p] for r, p in zip(requests, positions)], rows)
        return inputs

    def run(self, requests: list[Request], positions: list[int], exact: bool = False) -> torch.Tensor:
        batch = StaticDecodeBatch(self.pages, self.inputs(requests, positions, exact), self.tables.table)
        hidden = self.model.forward_decodes(batch)  # (bucket, hidden)
        batch.finish()
        return hidden[:len(requests)]


def assert_pages_equal(static: PagedKV, dynamic: PagedKV, requests: list[Request]) -> None:
    """Every real block of both pools and every real slot, bit for bit (the scratch ones aside)."""
    assert torch.equal(static.compressed.data[:NUM_BLOCKS], dynamic.compressed.data[:NUM_BLOCKS])
    assert torch.equal(static.window.data[:NUM_BLOCKS], dynamic.window.data[:NUM_BLOCKS])
    for request in requests:
        assert static.open_windows.tokens[request.slot] == dynamic.open_windows.tokens[request.slot]
        assert torch.equal(static.open_windows.pool.data[request.slot], dynamic.open_windows.pool.data[request.slot])


def paired_steps(model, count: int, exact: bool):
    """STEPS steps of the first `count` requests, static and dynamic side by side: per step
    (step, static hidden, dynamic hidden, static pages, dynamic pages, the requests)."""
    pages, requests, scratch = prefilled(model, LENGTHS[:count])
    dynamic_pages = copy.deepcopy(pages)
    steps = StaticSteps(model, pages, scratch)
    for step in range(STEPS):
        positions = [length + step for length in LENGTHS[:count]]
        expected = dynamic_step(model, dynamic_pages, requests[:count], positions)
        got = steps.run(requests[:count], positions, exact=exact)
        yield step, got, expected, pages, dynamic_pages, requests[:count]


@pytest.mark.parametrize("count", [1, 3, 8, 11])
def test_static_steps_of_the_steps_own_sizes_equal_dynamic_steps_bit_for_bit(model, count):
    """Keyed by the step's own N and widest context (no padding of either): every window pooled
    (the non-closing ones on the scratch slot), one packed buffer, the persistent table; three
    steps in a row, CSA and HCA windows closing for some rows and not others, at a block's end."""
    for step, got, expected, pages, dynamic_pages, requests in paired_steps(model, count, exact=True):
        assert torch.equal(got, expected), step
        assert torch.equal(model.compute_logits(got), model.compute_logits(expected))
        assert_pages_equal(pages, dynamic_pages, requests)


@pytest.mark.parametrize("count", [1, 3, 8])
def test_bucketed_static_steps_equal_dynamic_steps_within_float32_rounding(model, count):
    """Padded to the batch bucket (1 -> 1, 3 -> 4, 8 -> 8) and the context bucket: CPU matmuls of
    another row count or reduction width round differently (a few 1e-6 here), nothing more."""
    for _, got, expected, pages, dynamic_pages, _ in paired_steps(model, count, exact=False):
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
        assert torch.equal(model.compute_logits(got).argmax(-1), model.compute_logits(expected).argmax(-1))
        for pool in ("compressed", "window"):
            torch.testing.assert_close(getattr(pages, pool).data[:NUM_BLOCKS].view(torch.float32),
                                       getattr(dynamic_pages, pool).data[:NUM_BLOCKS].view(torch.float32),
                                       atol=TOLERANCE, rtol=TOLERANCE)


def test_padded_rows_and_scratch_contents_change_no_real_row(model):
    """The same padded step (3 requests in a bucket of 4) from the same pages, once with the
    scratch slot and blocks holding garbage: the real rows and real pages bit for bit."""
    runs = []
    for garbage in (False, True):
        pages, requests, scratch = prefilled(model, LENGTHS[:3])
        if garbage:
            generator = torch.Generator().manual_seed(11)
            for data in (pages.open_windows.pool.data[scratch.slot], pages.compressed.data[NUM_BLOCKS],
                         pages.window.data[NUM_BLOCKS]):
                data.view(torch.float32).copy_(torch.randn(data.numel() // 4, generator=generator) * 100)
        steps = StaticSteps(model, pages, scratch)
        hidden = [steps.run(requests, [length + step for length in LENGTHS[:3]]) for step in range(STEPS)]
        runs.append((torch.stack(hidden), pages, requests))
    (clean, clean_pages, requests), (dirty, dirty_pages, _) = runs
    assert torch.equal(clean, dirty)
    assert_pages_equal(dirty_pages, clean_pages, requests)


def static_layer_ops(model, lengths: list[int]) -> OpCounter:
    pages, requests, scratch = prefilled(model, lengths)
    steps = StaticSteps(model, pages, scratch)
    steps.run(requests, list(lengths))  # the pools' field views are made once, at their first use
    with OpCounter(layers=model.layers) as counter:
        steps.run(requests, [length + 1 for length in lengths])
    return counter


def test_a_static_steps_ops_depend_on_neither_the_requests_nor_the_context(model):
    """3 and 4 requests (one bucket), contexts of 2 .. 64 tokens (buckets 16, 64 and 128): the same
    ops dispatched, the same ops computing (every window pooled every step), no host sync."""
    counts = [static_layer_ops(model, lengths) for lengths in ([5, 40, 9], [15, 31, 62, 63], [1, 2, 3, 4])]
    assert counts[0].layers.ops == counts[1].layers.ops == counts[2].layers.ops
    assert counts[0].layers.computing == counts[1].layers.computing == counts[2].layers.computing
    assert all(counter.layers.sync_total() == 0 for counter in counts)
    assert "aten.lift_fresh" not in counts[0].layers.ops


def test_every_step_of_a_key_dispatches_the_same_calls_with_the_same_host_values(model):
    """What a CUDA graph replays is the launches of its capture, with their host values baked in:
    a step must take every value that changes from step to step from its input buffer, never from
    Python. Steps of one key (bucket 4, context 64) from other requests at other positions, for two
    steps each (the second after the first's windows closed): the same calls, argument for argument
    (tensors by layout: a view at a slot or position chosen on the host would differ)."""
    recorded = []
    for lengths in ([33, 40, 9], [15, 58, 50, 47], [60, 36, 35]):
        pages, requests, scratch = prefilled(model, lengths)
        steps = StaticSteps(model, pages, scratch)
        steps.run(requests, list(lengths))  # the pools' field views are made once, at their first use
        for step in (1, 2):
            inputs = steps.inputs(requests, [length + step for length in lengths])  # filled on the host
            assert inputs.key == StaticDecodeKey(4, 64)
            with OpCounter(record_calls=True) as counter:  # what decode_graphs.py captures
                model.forward_decodes(StaticDecodeBatch(pages, inputs, steps.tables.table))
            inputs.finish(pages)
            recorded.append(counter.calls)
    assert all(calls == recorded[0] for calls in recorded[1:])
    assert len(recorded[0]) > 100


def test_the_packed_inputs_of_a_padded_step(model):
    """Two requests in a bucket of 2 ... at positions 15 (closes a CSA window at a block's end and an
    HCA window) and 5 (closes none): each section of the one buffer, padded rows on the scratch."""
    pages, requests, scratch = prefilled(model, [15, 5, 1])
    steps = StaticSteps(model, pages, scratch)
    inputs = steps.inputs(requests[:2] + requests[2:], [15, 5, 1])  # 3 rows: bucket 4
    view = lambda name: inputs.view(name).tolist()
    first, second, third = requests
    assert inputs.key == StaticDecodeKey(4, 16)
    assert view("positions") == [15, 5, 1, 0]
    assert view("slots") == [first.slot, second.slot, third.slot, scratch.slot]
    assert view("closing_slots_4") == [first.slot, scratch.slot, scratch.slot, scratch.slot]
    assert view("entry_blocks_4") == [first.tables[0][0]] + [scratch.compressed_block] * 3
    assert view("entry_rows_4") == [3, 0, 0, 0] and view("entry_positions_4") == [12, 0, 0, 0]
    assert view("block_end_windows_4") == [first.tables[1][0]] + [scratch.window_block] * 3
    assert view("closing_slots_16") == [first.slot, scratch.slot, scratch.slot, scratch.slot]
    assert view("counts_4") == [4, 1, 0, 0] and view("counts_16") == [1, 0, 0, 0]
    assert view("pending_rows_4") == [3, 1, 1, 0]
    assert view("window_tables")[3] == [scratch.window_block] * steps.shape.window_span
    assert view("token_ids") == [first.ids[15], second.ids[5], third.ids[1], 0]
