"""DeepseekV4DecodeGraphs (decode_graphs.py): the key each decode step takes, the runner's steps of
decodes only through it (on a CPU the static step eagerly; mixed steps eager) giving the tokens
the eager runner gives, its static buffers for a padded step; on a GPU a graph's replay equals
the same static step run eagerly, bit for bit, and the dynamic step within bfloat16 rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from model_shards.deepseek_v4.decode_graphs import DeepseekV4DecodeGraphs
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.paged_decodes import DecodeBatch, PagedDecode
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.runner import DeepseekV4Runner
from model_shards.deepseek_v4.static_decodes import StaticDecodeBatch, StaticDecodeKey
from protocol.sampling_params import SamplingParams
from protocol.step import CachedRequestData, NewRequestData, StepInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BLOCK = 16  # the tiny preset's block
NUM_BLOCKS = 40  # the requests' blocks; block NUM_BLOCKS of each pool is the scratch
MAX_BATCH, MAX_MODEL_LEN, MAX_REQUESTS = 8, 256, 8
GREEDY = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_deepseek_v4_model(tmp_path_factory.mktemp("v4-decode-graphs"), "deepseek-v4-tiny", seed=6)


def make_pages(model) -> PagedKV:
    return PagedKV(PagePool(compressed_layout(model.arch, BLOCK, model.dtype), NUM_BLOCKS + 1, model.device),
                   PagePool(window_layout(model.arch, BLOCK, model.dtype), NUM_BLOCKS + 1, model.device), BLOCK)


def make_graphs(model, pages: PagedKV) -> DeepseekV4DecodeGraphs:
    return DeepseekV4DecodeGraphs(model, pages, (NUM_BLOCKS, NUM_BLOCKS), MAX_BATCH, MAX_MODEL_LEN, MAX_REQUESTS)


def test_the_key_of_a_step_is_its_batch_bucket_and_context_bucket(folder):
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    graphs = make_graphs(model, make_pages(model))
    assert graphs.sizes == [1, 2, 4, 6, 8]
    assert graphs.key_for([0]) == StaticDecodeKey(1, 16)  # at least a block
    assert graphs.key_for([5, 40, 9]) == StaticDecodeKey(4, 64)
    assert graphs.key_for([63] * 5) == StaticDecodeKey(6, 64) and graphs.key_for([64]) == StaticDecodeKey(1, 128)
    assert graphs.key_for([255]) == StaticDecodeKey(1, 256) and graphs.key_for([256]) is None  # past max_model_len
    assert graphs.key_for([1] * 9) is None  # past the largest bucket
    assert graphs.start_keys() == [StaticDecodeKey(rows, context) for rows in (1, 2, 4, 6, 8)
                                   for context in (16, 32, 64, 128, 256)]
    assert graphs.pages.open_windows.free and len(graphs.pages.open_windows.free) >= MAX_REQUESTS


def test_padded_rows_write_only_each_pools_own_scratch_block(folder):
    """The worker's pools differ in size (the window pool is smaller) and each keeps its last block
    as scratch: every start key's padded step (run eagerly on a CPU, as a capture's warm-up runs)
    stays in bounds and leaves every other block as it was. Session 11: the two scratch ids were
    swapped, and the flash shape's first capture indexed past the window pool on an H100."""
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    compressed_blocks, window_blocks = NUM_BLOCKS, NUM_BLOCKS - 15
    pages = PagedKV(PagePool(compressed_layout(model.arch, BLOCK, model.dtype), compressed_blocks + 1, model.device),
                    PagePool(window_layout(model.arch, BLOCK, model.dtype), window_blocks + 1, model.device), BLOCK)
    for pool in (pages.compressed, pages.window):
        pool.data.copy_(torch.randn(pool.data.shape, generator=torch.Generator().manual_seed(3)))
    before = pages.compressed.data.clone(), pages.window.data.clone()
    graphs = DeepseekV4DecodeGraphs(model, pages, (compressed_blocks, window_blocks), MAX_BATCH, MAX_MODEL_LEN,
                                    MAX_REQUESTS)
    assert (graphs.scratch.compressed_block, graphs.scratch.window_block) == (compressed_blocks, window_blocks)
    graphs.capture(graphs.start_keys())
    assert torch.equal(pages.compressed.data[:compressed_blocks], before[0][:compressed_blocks])
    assert torch.equal(pages.window.data[:window_blocks], before[1][:window_blocks])
    with pytest.raises(ValueError, match="scratch block 40 is not in the window pool of 26 blocks"):
        DeepseekV4DecodeGraphs(model, pages, (window_blocks, compressed_blocks), MAX_BATCH, MAX_MODEL_LEN,
                               MAX_REQUESTS)  # swapped: refused on the host, not a device assert


def runner_steps(folder, with_graphs: bool) -> tuple[list[dict[str, int]], DeepseekV4Runner]:
    """Three requests prefill, decode six steps (a fourth arrives at step 3: a mixed step, eager),
    one finishes at step 5; the sampled token ids of every step."""
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    pages = make_pages(model)
    runner = DeepseekV4Runner(model, pages, decode_graphs=make_graphs(model, pages) if with_graphs else None)
    prompts = {f"r{i}": tuple(range(7 * i + 3, 7 * i + 3 + length)) for i, length in enumerate((14, 31, 45, 20))}
    tables = {f"r{i}": (tuple(range(4 * i, 4 * i + 4)), tuple(range(20 + 4 * i, 24 + 4 * i))) for i in range(4)}
    computed = {rid: len(prompt) for rid, prompt in prompts.items()}
    arriving = {0: ["r0", "r1", "r2"], 3: ["r3"]}
    tokens, running = [], []
    for step in range(7):
        new = tuple(NewRequestData(rid, prompts[rid], (), GREEDY, tables[rid], 0) for rid in arriving.get(step, ()))
        finished = ("r1",) if step == 5 else ()
        running = [rid for rid in running if rid not in finished]
        cached = tuple(CachedRequestData(rid, ((), ()), computed[rid]) for rid in running)
        schedule = {**{rid: 1 for rid in running}, **{r.request_id: len(r.prompt_token_ids) for r in new}}
        output = runner.execute(StepInput(step, new_requests=new, cached_requests=cached,
                                          num_scheduled_tokens=schedule, finished_request_ids=finished))
        tokens.append({rid: sampled.token_id for rid, sampled in output.sampled.items()})
        for rid, count in schedule.items():
            computed[rid] += count if rid in running else 0
        running += [r.request_id for r in new]
    return tokens, runner


def test_the_runners_decode_steps_through_the_graphs_give_the_eager_runners_tokens(folder):
    eager, _ = runner_steps(folder, with_graphs=False)
    graphed, runner = runner_steps(folder, with_graphs=True)
    assert graphed == eager
    assert all(len(step) >= 3 for step in eager[1:])
    graphs = runner.decode_graphs
    # the decode-only steps: 1, 2 (3 requests -> 4 rows), 4 (4 rows), 5, 6 (3 rows -> 4); step 3 mixed, eager
    assert set(graphs.inputs) == {StaticDecodeKey(4, 64)}
    inputs = graphs.inputs[StaticDecodeKey(4, 64)]  # the last step: r0, r2, r3 and a padded row
    slots = [runner.requests[rid].slot for rid in ("r0", "r2", "r3")]
    assert inputs.view("slots").tolist() == slots + [graphs.scratch.slot]
    assert inputs.view("positions").tolist() == [14 + 5, 45 + 5, 20 + 2, 0]
    assert inputs.view("counts_4").tolist() == [5, 12, 5, 0]
    assert len(graphs.tables._row_of) == 3  # r1's row released when it finished


def test_graphed_steps_equal_eager_ones_when_the_top_k_is_wider_than_the_entries(tmp_path):
    """The flash shape's top-k (512) is wider than the CSA entries of every context below 2K tokens,
    so a static step there picks k = context // rate entries and masks each row past its own count;
    the tiny preset's top-4 never takes that branch. Same steps, a top-32 indexer (13 entries at most)."""
    wide = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=6, index_topk=32)
    eager, _ = runner_steps(wide, with_graphs=False)
    graphed, _ = runner_steps(wide, with_graphs=True)
    assert graphed == eager


def prefilled_on(folder, device: torch.device, lengths: list[int]) -> tuple:
    """The model in bfloat16 on `device`, pages holding prompts of `lengths` tokens: (ids, tables, slot) each."""
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.bfloat16, device=device)
    pages = make_pages(model)
    generator = torch.Generator().manual_seed(1)
    requests = []
    for i, length in enumerate(lengths):
        tables = (list(range(4 * i, 4 * i + 4)), list(range(20 + 4 * i, 24 + 4 * i)))
        ids = torch.randint(0, 1000, (length + 1,), generator=generator).tolist()
        slot = pages.open_windows.take(model.new_state)
        state = pages.load(model.new_state, tables, 0, slot)
        model.forward(torch.tensor(ids[:length], device=device), state)
        pages.save(state, slot)
        requests.append((ids, tables, slot))
    return model, pages, requests


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_graph_replay_equals_the_same_static_step_run_eagerly(folder):
    """Three requests (bucket 4), contexts closing CSA / HCA windows and none: the replay's hidden
    states and pages bit for bit as the static step run eagerly; within bf16 rounding of the dynamic step."""
    device, lengths = torch.device("cuda"), [15, 40, 31]
    model, pages, requests = prefilled_on(folder, device, lengths)
    eager_pages, dynamic_pages = copy.deepcopy(pages), copy.deepcopy(pages)
    decodes = [PagedDecode(length, slot, tables, torch.tensor(tables[0], device=device))
               for length, (_, tables, slot) in zip(lengths, requests)]
    token_ids = [ids[length] for length, (ids, _, _) in zip(lengths, requests)]
    graphs = make_graphs(model, pages)
    graphs.capture([StaticDecodeKey(4, 64)])
    replayed = graphs.run([slot for _, _, slot in requests], decodes, token_ids).clone()
    eager_graphs = make_graphs(model, eager_pages)  # the same static step, no capture
    eager_graphs.tables.rows_for([slot for _, _, slot in requests], [d.tables[0] for d in decodes])
    inputs = eager_graphs._inputs(StaticDecodeKey(4, 64))
    inputs.fill(decodes, token_ids, [0, 1, 2])
    eager = model.forward_decodes(StaticDecodeBatch(eager_pages, inputs, eager_graphs.tables.table))[:3]
    assert torch.equal(replayed, eager)
    assert torch.equal(pages.compressed.data[:NUM_BLOCKS], eager_pages.compressed.data[:NUM_BLOCKS])
    assert torch.equal(pages.window.data[:NUM_BLOCKS], eager_pages.window.data[:NUM_BLOCKS])
    batch = DecodeBatch(dynamic_pages, model.arch.sliding_window, decodes, None, len(decodes))
    dynamic = model.forward_segments([(torch.tensor([t], device=device), None) for t in token_ids], batch)
    torch.testing.assert_close(replayed.float(), dynamic.float(), atol=0.1, rtol=0.05)


def test_a_failed_capture_leaves_every_decode_step_eager(folder):
    """A capture that raises (a host sync in some kernel, say) must not fail the step: `run` says
    None (the runner then runs the step eagerly) for that key and every other, trying no capture again."""
    model, pages, requests = prefilled_on(folder, torch.device("cpu"), [15, 40])
    graphs = make_graphs(model, pages)
    attempts = []

    def failing_record(key):
        attempts.append(key)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._record = failing_record
    decodes = [PagedDecode(length, slot, tables, None) for length, (_, tables, slot) in zip([15, 40], requests)]
    token_ids = [ids[length] for length, (ids, _, _) in zip([15, 40], requests)]
    assert graphs.run([slot for _, _, slot in requests], decodes, token_ids) is None
    assert graphs.run([requests[0][2]], decodes[:1], token_ids[:1]) is None  # another key: not tried
    assert attempts == [StaticDecodeKey(2, 64)]
    assert "operation not permitted" in graphs.capture_error
