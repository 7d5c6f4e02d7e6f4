"""A decode step's paged decodes batched (paged_decodes.py: window, open windows, entries written and
read as one op each over all N) equal the same step with each decode on its own state loaded from
the pages (float32, CPU): the pages and open windows they leave bit for bit, hidden states within
float32 rounding; and against the in-memory model one request at a time. A decode step dispatches
the same ops for 1 and 8 requests, none of them a host sync."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from model_shards.deepseek_v4 import paged_decodes as paged_decodes_module
from model_shards.deepseek_v4.entries import ContiguousEntries
from model_shards.deepseek_v4.index_scores import decode_index_scores, gathered_index_scores, ranking_keys
from model_shards.deepseek_v4.indexer import top_k_of_ranking
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.op_count import OpCounter
from model_shards.deepseek_v4.paged_decodes import DecodeBatch, PagedDecode
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.positions import span_positions
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.runner import DeepseekV4Runner
from protocol.sampling_params import SamplingParams
from protocol.step import CachedRequestData, NewRequestData, StepInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BLOCK = 16  # the tiny preset's block: CSA windows of 4 (4 a block), HCA windows of 16 (one a block)
TOLERANCE = 1e-5
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_deepseek_v4_model(tmp_path_factory.mktemp("v4-paged-decodes"), "deepseek-v4-tiny", seed=4)
    return DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)


@dataclass
class Request:
    ids: torch.Tensor
    tables: tuple[list[int], list[int]]  # compressed, window
    slot: int


def make_pages(model) -> PagedKV:
    return PagedKV(PagePool(compressed_layout(model.arch, BLOCK, model.dtype), NUM_BLOCKS, "cpu"),
                   PagePool(window_layout(model.arch, BLOCK, model.dtype), NUM_BLOCKS, "cpu"), BLOCK)


def make_requests(model, pages: PagedKV, lengths: list[int]) -> list[Request]:
    """Requests of lengths tokens, on shuffled blocks (the same ids for every PagedKV made alike)."""
    generator = torch.Generator().manual_seed(9)
    order = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    requests = []
    for length in lengths:
        blocks = -(-length // BLOCK)
        tables = (order[:blocks], order[-blocks:])
        order = order[blocks:-blocks]
        requests.append(Request(torch.randint(0, 1000, (length,), generator=generator), tables,
                                pages.open_windows.take(model.new_state)))
    return requests


def run_step(model, pages: PagedKV, chunks: list[tuple[Request, int, int]], batched: bool) -> torch.Tensor:
    """One forward pass of (request, start, count) chunks: a single token whose open windows are in
    its slot decodes on the pages if `batched`; every other chunk on its state loaded from the pages."""
    segments, decodes, rows, row = [], [], [], 0
    for request, start, count in chunks:
        ids = request.ids[start:start + count]
        if batched and count == 1 and pages.open_windows.holds(request.slot, start):
            decodes.append(PagedDecode(start, request.slot, request.tables, torch.tensor(request.tables[0])))
            segments.append((ids, None))
            rows.append(row)
        else:
            segments.append((ids, pages.load(model.new_state, request.tables, start, request.slot)))
        row += count
    batch = DecodeBatch(pages, model.arch.sliding_window, decodes, None if len(rows) == row else rows, row) \
        if decodes else None
    hidden = model.forward_segments(segments, batch)
    for (request, _, _), (_, state) in zip(chunks, segments):
        if state is not None:
            pages.save(state, request.slot)
    return hidden


def assert_open_windows_equal(batched: PagedKV, alone: PagedKV, requests: list[Request]) -> None:
    """Each slot's open window (its first n % m rows) and overlap half, bit for bit."""
    for (layer, name), field in batched.open_windows.fields().items():
        for request in requests:
            tokens = batched.open_windows.tokens[request.slot]
            assert alone.open_windows.tokens[request.slot] == tokens
            rows = tokens % field.rows if "pending" in name else field.rows
            got = batched.open_windows.view(layer, name)[request.slot, :rows]
            assert torch.equal(got, alone.open_windows.view(layer, name)[request.slot, :rows]), (layer, name)


# prompts whose next tokens: start a request's window (3: its first CSA window closes, fewer entries
# than top-k), close a CSA window at a block's end together with an HCA window (15, 31, 47, 63), close
# no window (5, 40, 62); with a request prefilling beside them (a first chunk, one inside a block)
LENGTHS = [5, 15, 31, 40, 47, 62, 63, 3]
PREFILL = [21, 6, 1]  # the chunks of a request arriving with the first step


def prefilled(model, extra: int) -> tuple[PagedKV, list[Request]]:
    """Pages holding the LENGTHS prompts and a request that prefills beside their decodes."""
    pages = make_pages(model)
    requests = make_requests(model, pages, [length + extra for length in LENGTHS] + [sum(PREFILL)])
    run_step(model, pages, [(request, 0, length) for request, length in zip(requests, LENGTHS)], batched=False)
    return pages, requests


def test_batched_paged_decodes_beside_a_prefill_equal_each_decode_on_its_own_state(model):
    """Three steps of the model: eight decodes and a prefilling request's chunks (first, inside a
    block, then a single token that is batched too), hidden states within float32 rounding."""
    runs = {}
    for batched in (True, False):
        pages, requests = prefilled(model, len(PREFILL))
        hidden, done = [], 0
        for step, chunk in enumerate(PREFILL):
            decoding = [(request, length + step, 1) for request, length in zip(requests, LENGTHS)]
            hidden.append(run_step(model, pages, decoding + [(requests[-1], done, chunk)], batched))
            done += chunk
        runs[batched] = hidden
    for got, want in zip(runs[True], runs[False]):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("layer", [0, 1, 2, 3], ids=["sliding", "csa", "hca", "csa-last"])
def test_one_layers_batched_decodes_write_the_same_bits_as_decodes_on_their_own_states(model, layer):
    """The same layer input, batched against one state per decode (and a prefill chunk beside
    them): the window keys, entries, indexer keys, overlap halves and open windows they leave
    are bit for bit the same; the attention output within float32 rounding."""
    attention = model.layers[layer].self_attn
    pages, requests = prefilled(model, 1)
    alone_pages = copy.deepcopy(pages)
    chunks = [(request, length, 1) for request, length in zip(requests, LENGTHS)] + [(requests[-1], 0, PREFILL[0])]
    x = torch.randn(len(LENGTHS) + PREFILL[0], model.arch.hidden_size, generator=torch.Generator().manual_seed(layer))
    positions = span_positions([(start, count) for _, start, count in chunks], x.device)

    prefill = pages.load(model.new_state, requests[-1].tables, 0, requests[-1].slot)
    decodes = [PagedDecode(start, request.slot, request.tables, torch.tensor(request.tables[0]))
               for request, start, _ in chunks[:-1]]
    batch = DecodeBatch(pages, model.arch.sliding_window, decodes, list(range(len(decodes))), x.shape[0])
    segments = [(start, count, None) for _, start, count in chunks[:-1]] + [(0, PREFILL[0], prefill.layers[layer])]
    with torch.inference_mode():
        batched = attention.forward_segments(x, segments, positions, batch.layer(layer))
    prefill.num_tokens = PREFILL[0]
    pages.save(prefill, requests[-1].slot)
    batch.finish()

    states = [alone_pages.load(model.new_state, request.tables, start, request.slot) for request, start, _ in chunks]
    with torch.inference_mode():
        alone = attention.forward_segments(x, [(start, count, state.layers[layer])
                                               for (_, start, count), state in zip(chunks, states)], positions)
    for (request, start, count), state in zip(chunks, states):
        state.num_tokens = start + count
        alone_pages.save(state, request.slot)

    torch.testing.assert_close(batched, alone, atol=TOLERANCE, rtol=TOLERANCE)
    assert torch.equal(pages.window.data, alone_pages.window.data)
    assert torch.equal(pages.compressed.data, alone_pages.compressed.data)
    assert_open_windows_equal(pages, alone_pages, requests)


def test_batched_paged_decodes_equal_the_in_memory_model_one_request_at_a_time(model):
    """Three steps of eight batched decodes (windows of some closing, of others not) against each
    request run alone on its in-memory state."""
    pages, requests = prefilled(model, 3)
    alone = [model.new_state() for _ in LENGTHS]
    for request, state, length in zip(requests, alone, LENGTHS):
        model(request.ids[:length], state)
    for step in range(3):
        decoding = [(request, length + step, 1) for request, length in zip(requests, LENGTHS)]
        hidden = run_step(model, pages, decoding, batched=True)
        expected = torch.cat([model(request.ids[length + step:length + step + 1], state)
                              for request, state, length in zip(requests, alone, LENGTHS)])
        torch.testing.assert_close(hidden, expected, atol=TOLERANCE, rtol=TOLERANCE)


GREEDY = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


def decode_step_counts(model, requests: int) -> OpCounter:
    """The ops of a runner's second decode step of `requests` requests (prompts of 40 .. 44 tokens)."""
    runner = DeepseekV4Runner(model, make_pages(model))
    new = [NewRequestData(f"r{i}", tuple(range(5, 45 + i % 5)), (), GREEDY,
                          (tuple(range(4 * i, 4 * i + 4)), tuple(range(4 * i, 4 * i + 4))), 0) for i in range(requests)]
    runner.execute(StepInput(0, new_requests=tuple(new),
                             num_scheduled_tokens={r.request_id: len(r.prompt_token_ids) for r in new}))
    for step in (1, 2):
        cached = tuple(CachedRequestData(r.request_id, ((), ()), len(r.prompt_token_ids) + step - 1) for r in new)
        with OpCounter(layers=model.layers) as counter:
            runner.execute(StepInput(step, cached_requests=cached, num_scheduled_tokens={r.request_id: 1 for r in new}))
    return counter


def test_a_decode_steps_layers_dispatch_the_same_ops_for_one_and_eight_requests_and_no_host_sync(model):
    one, eight = decode_step_counts(model, 1), decode_step_counts(model, 8)
    assert one.layers.ops == eight.layers.ops
    assert one.layers.total() > 1000
    assert one.layers.sync_total() == eight.layers.sync_total() == 0
    assert "aten.lift_fresh" not in eight.layers.ops  # no host tensor made in the layers: all prepared before
    assert eight.step.sync_total() == 0  # on a CPU the sampler's token ids need no device read either
    # outside the layers: the runner's per-request views of its ids and block tables, the sampler
    assert eight.step.total() - eight.layers.total() < one.step.total() - one.layers.total() + 8 * 8


def test_op_counter_finds_host_syncs_and_tells_views_from_ops_that_compute():
    values = torch.arange(6.0)
    with OpCounter() as counter:
        values.sum().item()
        values[values > 2]
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        values.view(2, 3)
        values.to(torch.float32)
    assert dict(counter.step.syncs) == {"aten._local_scalar_dense": 1, "aten.index": 1, "aten.repeat_interleave": 1}
    assert counter.step.ops["aten.view"] == 1 and counter.step.computing["aten.view"] == 0
    assert counter.step.computing["aten.sum"] == 1 and counter.step.computing["aten.to"] == 0


def test_index_scores_of_keys_gathered_at_once_equal_the_per_request_reference():
    """The CPU path of a paged decode step's indexer (every decode's keys in one (N, E_max) block)
    against decode_index_scores' per-request reference; entry counts none, < and > top-k: scores
    within float32 rounding (a batched matmul sums in its own order), the same top-k."""
    generator = torch.Generator().manual_seed(5)
    counts, heads, dim = [3, 0, 8, 21], 4, 16
    keys = [torch.randn(count, dim, generator=generator) for count in counts]
    q, weights = torch.randn(len(counts), heads, dim, generator=generator), torch.randn(len(counts), heads)
    gathered = torch.zeros(len(counts), max(counts), dim)
    for row, rows in enumerate(keys):
        gathered[row, :rows.shape[0]] = rows
    allowed = torch.arange(max(counts)) < torch.tensor(counts)[:, None]
    expected = decode_index_scores(q, weights, [ContiguousEntries(rows) for rows in keys])
    scores = gathered_index_scores(q, weights, gathered, allowed)
    torch.testing.assert_close(scores, expected, atol=TOLERANCE, rtol=TOLERANCE)
    assert torch.equal(top_k_of_ranking(gathered_index_scores(q, weights, gathered, allowed, ranked=True), 8),
                       top_k_of_ranking(ranking_keys(expected), 8))


def test_the_index_kernel_of_a_paged_decode_step_reads_the_keys_the_gather_reads(model, monkeypatch):
    """The GPU branch (one kernel over the step's block tables side by side; Triton's interpreter
    here, float16) against the CPU branch (the keys gathered by address), on shuffled pages."""
    half = torch.float16
    pages = PagedKV(PagePool(compressed_layout(model.arch, BLOCK, half), NUM_BLOCKS, "cpu"),
                    PagePool(window_layout(model.arch, BLOCK, half), NUM_BLOCKS, "cpu"), BLOCK)
    generator = torch.Generator().manual_seed(6)
    index_keys = pages.compressed.view(1, "index_keys")
    index_keys.copy_(torch.randn(index_keys.shape, generator=generator))
    requests = make_requests(model, pages, [length + 1 for length in LENGTHS])
    decodes = [PagedDecode(length, request.slot, request.tables, torch.tensor(request.tables[0]))
               for request, length in zip(requests, LENGTHS)]
    windows = DecodeBatch(pages, model.arch.sliding_window, decodes, None, len(decodes)).layer(1).indexer
    q = torch.randn(len(decodes), model.arch.index_n_heads, model.arch.index_head_dim, generator=generator).to(half)
    weights = torch.randn(len(decodes), model.arch.index_n_heads, generator=generator)
    scores = {}
    for fused in (True, False):
        monkeypatch.setattr(paged_decodes_module, "fused_kernel_runs", lambda q, dtype, fused=fused: fused)
        scores[fused] = windows.index_scores(q, weights, ranked=False)
    assert scores[True].shape == (len(decodes), (max(LENGTHS) + 1) // 4)
    torch.testing.assert_close(scores[True], scores[False], atol=TOLERANCE, rtol=TOLERANCE)
