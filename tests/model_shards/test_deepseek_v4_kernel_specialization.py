"""V4's Triton kernels compile once, not again as a prompt grows.

Triton compiles a kernel anew for each new specialization key of a launch (model_shards/
triton_compiles.py: a constexpr's value, an integer being 1 or a multiple of 16, ...). On the
H200, chunks of a long prompt that met a new key took 0.5-1.5 s (session 5: 128K chunks 3, 4
and 7, 1M chunks 8, 20 and 30, each where the indexer's query blocks or HCA's key counts first
took a new divisibility or block size). These tests launch the kernels (Triton's interpreter on a
CPU) with the lengths a long prompt passes them and assert one key for all.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from model_folder.deepseek_v4_config import CSA, HCA
from model_folder.deepseek_v4_quantization import BlockQuantization
from model_shards.deepseek_v4 import sink_attention as attention_core
from model_shards.deepseek_v4.entries import BlockRows, ContiguousEntries, PagedEntries
from model_shards.deepseek_v4.index_scores import decode_index_scores_triton, index_scores_triton
from model_shards.deepseek_v4.index_scores_kernel import _decode_index_scores, _index_scores
from model_shards.deepseek_v4.kernel_warmup import (DECODE_STEPS, QUANTIZED_ROW_LADDER, WARM_UP_IDS, kept_expert_stacks,
                                                    kept_weights, warm_up_chunks,
                                                    warm_up_quantized_linears, warm_up_runner, warm_up_steps)
from model_shards.deepseek_v4.kv_pages import PagePool, compressed_layout, window_layout
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.deepseek_v4.presets import make_deepseek_v4_model
from model_shards.deepseek_v4.runner import DeepseekV4Runner
from model_shards.deepseek_v4.sink_attention import CompressedKeys, sink_attention
from model_shards.deepseek_v4.sink_softmax import _sink_softmax
from model_shards.triton_compiles import LaunchKeys, specialization_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HEADS, DIM, ROWS_PER_BLOCK, RATE = 2, 16, 8, 4
# (tokens, entries, first position) of blocks of a long prompt: 1, multiples of 16 and neither
LENGTHS = [(16, 64, 0), (17, 33, 5), (1, 47, 180), (5, 128, 1024), (33, 100, 99)]


def paged(rows: torch.Tensor) -> PagedEntries:
    pool = torch.zeros(40, ROWS_PER_BLOCK, DIM, dtype=rows.dtype)
    table = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:-(-rows.shape[0] // ROWS_PER_BLOCK)]
    return PagedEntries(pool, BlockRows(table, ROWS_PER_BLOCK), 0).append(rows)


@pytest.mark.parametrize("on_pages", [False, True])
def test_index_scores_compile_one_kernel_for_every_length(on_pages):
    generator = torch.Generator().manual_seed(1)
    with LaunchKeys(_index_scores) as launches:
        for tokens, entries, first_position in LENGTHS:
            q = torch.randn(tokens, HEADS, DIM, generator=generator).half()
            rows = torch.randn(entries, DIM, generator=generator).half()
            keys = paged(rows) if on_pages else ContiguousEntries(rows)
            index_scores_triton(q, torch.rand(tokens, HEADS), keys, first_position, RATE, block_tokens=16,
                                block_entries=16, ranked=True)
    assert len(launches.keys[_index_scores]) == len(LENGTHS)
    assert len(set(launches.keys[_index_scores])) == 1


def test_decode_index_scores_compile_one_kernel_for_every_widest_count():
    generator = torch.Generator().manual_seed(2)
    with LaunchKeys(_decode_index_scores) as launches:
        for counts in [(16, 3), (17, 40), (1, 1), (64, 33, 9)]:
            keys = [paged(torch.randn(count, DIM, generator=generator).half()) for count in counts]
            q = torch.randn(len(counts), HEADS, DIM, generator=generator).half()
            decode_index_scores_triton(q, torch.rand(len(counts), HEADS), keys, ranked=True, block_entries=16)
    assert len(set(launches.keys[_decode_index_scores])) == 1


def test_hca_chunks_of_a_growing_prompt_compile_one_softmax(monkeypatch):
    """Full chunks at growing positions, then a prompt's shorter last chunk, each in blocks of a
    few queries (a small block bound): every block of every chunk launches the softmax with one
    key, whatever the number of entries its queries see. As on the model's shapes (16384-token
    chunks, HCA rate 128, window 128), a full chunk closes a multiple of 16 entries; the last one
    reads zero rows up to the next multiple (aligned_rows); a window mask row is 16 bytes or more."""
    monkeypatch.setattr(attention_core, "block_elements", lambda device: 5 * HEADS * 40)
    monkeypatch.setattr(attention_core, "attend", attention_core.attend_fused)  # the GPU's path, interpreted
    generator, window, chunk = torch.Generator().manual_seed(3), 16, 64
    with LaunchKeys(_sink_softmax) as launches:
        for start, tokens in ((64, chunk), (128, chunk), (192, chunk), (256, chunk), (320, 50)):
            entries = ContiguousEntries(torch.randn((start + tokens) // RATE, DIM, generator=generator))
            q = torch.randn(tokens, HEADS, DIM, generator=generator)
            window_keys = torch.randn(window - 1 + tokens, DIM, generator=generator)
            sink_attention(q, window_keys, window, CompressedKeys(entries, None, start, RATE),
                           torch.randn(HEADS, generator=generator), DIM ** -0.5)
    keys = launches.keys[_sink_softmax]
    assert len(keys) >= 5 * 3  # several blocks per chunk
    assert len(set(keys)) == 1


def test_a_key_tells_lengths_apart_unless_told_not_to():
    """The key function itself: a specialized integer's divisibility and a constexpr's value count,
    an unspecialized integer's value does not (else the tests above could not fail)."""
    tensor = torch.zeros(4, HEADS, DIM).half()
    base = dict(tokens=16, entries=32, first_position=0, rate=4, rows_per_block=8)
    key = lambda **change: specialization_key(_index_scores, (), {  # noqa: E731
        **dict.fromkeys(["q_ptr", "weight_ptr", "key_ptr", "table_ptr", "out_ptr"], tensor),
        **base, **dict.fromkeys(["stride_q_token", "stride_q_head", "stride_weight_token", "stride_key_block",
                                 "stride_key_row", "stride_out_token"], 16),
        "HEADS": HEADS, "DIM": DIM, "BT": 16, "BE": 16, "RANKED": True, **change})
    assert key(tokens=17) == key() and key(entries=1) == key()  # not specialized: one kernel
    assert key(rows_per_block=32) != key() and key(rate=1) != key()  # specialized: a kernel each
    assert key(BT=64) != key()


@pytest.mark.parametrize("csa_rate, hca_rate", [(4, 128), (4, 16), (2, 8)])
def test_warm_up_chunks_take_every_variant(csa_rate, hca_rate):
    chunks = warm_up_chunks(csa_rate, hca_rate)
    ends = list(itertools.accumulate(chunks))
    assert all(length > 0 for length in chunks)
    assert any(length <= 16 for length in chunks) and any(length > 16 for length in chunks)  # both tile heights
    hca_entries = {end // hca_rate % 16 == 0 for end in ends[1:]}
    assert hca_entries == {True, False} and min(end // hca_rate for end in ends[1:]) >= 16
    assert ends[0] // csa_rate % 16 != 0


def test_warm_up_runs_as_engine_steps_on_the_pages_and_drops_its_requests(tmp_path):
    """The worker's warm-up (CUDA only) through a real runner on CPU pages: every step runs, the
    long prompt samples after its last chunk and both requests decode, and nothing stays behind."""
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=4)
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    arch, block = model.arch, 16
    pages = PagedKV(PagePool(compressed_layout(arch, block, model.dtype), 64, "cpu"),
                    PagePool(window_layout(arch, block, model.dtype), 64, "cpu"), block)
    runner = DeepseekV4Runner(model, pages)
    steps = warm_up_steps(arch.compress_rate(CSA), arch.compress_rate(HCA), block)
    sampled = [set(runner.execute(step).sampled) for step in steps]
    assert len(steps) == len(warm_up_chunks(arch.compress_rate(CSA), arch.compress_rate(HCA))) + 2 * DECODE_STEPS + 1
    assert sampled[len(steps) - 2] == set(WARM_UP_IDS) and sampled[len(steps) - 2 - DECODE_STEPS] == {WARM_UP_IDS[1]}
    assert runner.requests == {}
    small = PagedKV(PagePool(compressed_layout(arch, block, model.dtype), 4, "cpu"),
                    PagePool(window_layout(arch, block, model.dtype), 4, "cpu"), block)
    assert warm_up_runner(DeepseekV4Runner(model, small)) == 0  # too few blocks: skipped, not a crash


@pytest.mark.parametrize("expert_dtype", ["fp8", "fp4"])
def test_warm_up_multiplies_every_kept_weight_at_every_tiling(tmp_path, expert_dtype):
    """A released folder kept quantized: each distinct kept weight and expert stack runs once per
    row count of the ladder (on a CPU through the reference: the calls, not the kernels)."""
    folder = make_deepseek_v4_model(tmp_path, "deepseek-v4-tiny", seed=5,
                                    quantization=BlockQuantization(scale_format="ue8m0", expert_format=expert_dtype))
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32, keep_quantized=True)
    weights, stacks = kept_weights(model), kept_expert_stacks(model)
    assert len(weights) >= 5 and stacks
    assert warm_up_quantized_linears(model) == (len(weights) + len(stacks)) * len(QUANTIZED_ROW_LADDER)
    unkept = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.float32)
    assert kept_weights(unkept) == [] and kept_expert_stacks(unkept) == []
