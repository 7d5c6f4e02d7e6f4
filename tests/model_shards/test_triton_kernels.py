"""The Triton kernels against their torch references on random paged layouts.

Without CUDA they run in Triton's interpreter (model_shards/attention/triton_runtime.py); on a
GPU the same tests run the compiled kernels. Every case draws fresh random data; the cache is a
layer view of a 3-layer block-major tensor, so block strides are the real ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from model_shards.attention.base import write_kv  # noqa: E402
from model_shards.attention.triton_paged_decode import (DEFAULT_PLAN, DecodePlan, paged_decode,  # noqa: E402
                                                        paged_decode_reference)
from model_shards.attention.triton_store_kv import store_kv  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# ||out - ref|| / ||ref||: float32 rounding only; fp16/bf16 round the inputs of each dot product.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16] + ([] if DEVICE.type == "cuda" else [torch.float32])


def layer_view(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, generator) -> torch.Tensor:
    """Layer 1 of a (blocks, 3 layers, 2, block_size, KV, D) cache filled with random values."""
    full = torch.randn(num_blocks, 3, 2, block_size, kv_heads, head_dim, generator=generator)
    return full.to(dtype=dtype, device=DEVICE)[:, 1]


def random_tables(lengths: list[int], num_blocks: int, block_size: int, generator) -> torch.Tensor:
    """(S, width) int32: each row distinct random blocks in random order, enough for its length."""
    width = max(-(-length // block_size) for length in lengths) + 1
    return torch.stack([torch.randperm(num_blocks, generator=generator)[:width] for _ in lengths]).to(
        torch.int32).to(DEVICE)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def plan(max_splits: int, tile_tokens: int = 64, min_split_tiles: int = 1) -> DecodePlan:
    return DecodePlan(max_splits=max_splits, min_split_tiles=min_split_tiles, tile_tokens=tile_tokens)


def random_case(lengths: list[int], block_size: int, heads: int, kv_heads: int, head_dim: int, dtype, seed: int):
    """(query, layer cache, block tables, seq_lens) on random data and random block layouts."""
    generator = torch.Generator().manual_seed(seed)
    cache = layer_view(40, block_size, kv_heads, head_dim, dtype, generator)
    tables = random_tables(lengths, 40, block_size, generator)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    query = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype=dtype, device=DEVICE)
    return query, cache, tables, seq_lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, heads, kv_heads, head_dim, decode_plan", [
    (16, 4, 4, 64, plan(1)),  # no GQA, one split; 4 blocks a tile (block ids read as a vector)
    (16, 8, 2, 64, plan(3, tile_tokens=16)),  # GQA 4, splits that do not divide the tiles
    (32, 6, 1, 80, plan(4, tile_tokens=32)),  # GQA 6 (not a power of two), head_dim padded to 128
    (64, 32, 8, 128, plan(5)),  # the 8B shape
    (128, 12, 4, 64, plan(2, min_split_tiles=2)),  # two tiles a block, two tiles a split at least
])
def test_paged_decode_matches_reference(dtype, block_size, heads, kv_heads, head_dim, decode_plan):
    lengths = [1, block_size, 2 * block_size + 3, 5 * block_size - 1, 0]  # 0: an idle (padded) row
    query, cache, tables, seq_lens = random_case(lengths, block_size, heads, kv_heads, head_dim, dtype,
                                                 block_size * heads + decode_plan.max_splits)
    out = paged_decode(query, cache, tables, seq_lens, head_dim ** -0.5, max(lengths), decode_plan, num_sms=4)
    ref = paged_decode_reference(query, cache, tables, seq_lens, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == query.shape
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # no keys: exactly 0, not NaN


def test_split_count_changes_only_rounding():
    lengths = [300, 17]
    query, cache, tables, seq_lens = random_case(lengths, 16, 8, 2, 64, torch.float16, 7)
    one = paged_decode(query, cache, tables, seq_lens, 0.125, 300, plan(1, tile_tokens=16))
    many = paged_decode(query, cache, tables, seq_lens, 0.125, 300, plan(7, tile_tokens=16))
    assert relative_error(many, one) < 2e-3


@pytest.mark.parametrize("num_sms", [None, 1, 3])  # a program per split slot, one looping over all, a few
def test_grid_and_padding_do_not_change_a_bit(num_sms):
    """What a CUDA graph does to a step: slots for max_model_len, idle rows after the real ones,
    another batch size and so another number of programs per head. Each real row's output must be
    bitwise the eager one (splits by its own length, whichever program computes them)."""
    lengths = [300, 17, 129]
    decode_plan = DecodePlan(max_splits=8, min_split_tiles=2, tile_tokens=16, waves=1)
    query, cache, tables, seq_lens = random_case(lengths + [0, 0], 16, 8, 2, 64, torch.float16, 11)
    eager = paged_decode(query[:3], cache, tables[:3], seq_lens[:3], 0.125, max(lengths), decode_plan)
    graph_like = paged_decode(query, cache, tables, seq_lens, 0.125, 40 * 16, decode_plan, num_sms)
    assert decode_plan.split_slots(max(lengths)) == 8 and decode_plan.split_slots(17) == 1
    assert torch.equal(graph_like[:3], eager)
    assert torch.equal(graph_like[3:], torch.zeros_like(graph_like[3:]))


def test_paged_decode_rejects_what_it_cannot_run():
    cache = torch.zeros(4, 2, 8, 2, 64, device=DEVICE, dtype=torch.float16)
    query = torch.zeros(1, 4, 64, device=DEVICE, dtype=torch.float16)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_size 8"):
        paged_decode(query, cache, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), lens, 1.0, 1)
    cache = torch.zeros(4, 2, 16, 3, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode(query, cache, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), lens, 1.0, 1)
    with pytest.raises(ValueError, match="one length per query row"):
        paged_decode(torch.zeros(1, 3, 64, device=DEVICE, dtype=torch.float16), cache,
                     torch.zeros(2, 1, dtype=torch.int32, device=DEVICE), lens, 1.0, 1)


def test_split_plan_depends_on_the_length_only_and_the_grid_covers_it():
    assert DEFAULT_PLAN.splits_for(131072) == DEFAULT_PLAN.max_splits  # 2048 tiles: 16 a split
    assert DEFAULT_PLAN.splits_for(1 << 20) == DEFAULT_PLAN.max_splits
    assert DEFAULT_PLAN.splits_for(100) == 1 and DEFAULT_PLAN.splits_for(0) == 0
    assert DEFAULT_PLAN.splits_for(8192) == 128 // DEFAULT_PLAN.min_split_tiles
    small = plan(5, tile_tokens=16, min_split_tiles=3)
    for bound in range(1, 2000, 7):
        slots = small.split_slots(bound)
        assert max(small.splits_for(length) for length in range(bound + 1)) <= slots <= small.max_splits
        assert slots == small.splits_for(bound) or bound > 16 * 3 * 5  # tight below the cap


def test_programs_fill_the_sms_without_idle_ones():
    one_million = 1 << 20
    assert DEFAULT_PLAN.programs_per_kv_head(one_million, 1, 8, 132) == 64  # 64 items: one each
    assert DEFAULT_PLAN.programs_per_kv_head(one_million, 32, 8, 132) == 66  # 8 x 66: ~4 waves
    assert DEFAULT_PLAN.programs_per_kv_head(one_million, 256, 8, 132) == 66  # not 256 x 64 mostly idle
    assert DEFAULT_PLAN.programs_per_kv_head(1000, 1, 8, 132) == 4  # 16 tiles: 4 splits
    assert DEFAULT_PLAN.programs_per_kv_head(one_million, 2, 8, None) == 128


def test_many_sequences_of_mixed_lengths():
    """More sequences than one vector of lengths (64) and a long context among short ones: every
    (sequence, split) item found by whichever program takes it."""
    lengths = [1 + (7 * i) % 16 for i in range(69)] + [0, 620]
    generator = torch.Generator().manual_seed(5)
    cache = layer_view(160, 16, 1, 64, torch.float16, generator)
    tables = random_tables(lengths, 160, 16, generator)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    query = torch.randn(len(lengths), 2, 64, generator=generator).to(dtype=torch.float16, device=DEVICE)
    decode_plan = DecodePlan(max_splits=8, min_split_tiles=1, tile_tokens=16, waves=3)
    out = paged_decode(query, cache, tables, seq_lens, 0.125, 620, decode_plan, num_sms=3)  # 9 programs
    ref = paged_decode_reference(query, cache, tables, seq_lens, 0.125)
    assert relative_error(out, ref) < TOLERANCE[torch.float16]
    assert torch.equal(out[69], torch.zeros_like(out[69]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_write_kv_and_skips_negative_slots(dtype):
    generator = torch.Generator().manual_seed(3)
    full = torch.randn(12, 3, 2, 16, 3, 80, generator=generator).to(dtype=dtype, device=DEVICE)
    expected_full = full.clone()
    qkv = torch.randn(9, 5 * 80, generator=generator).to(dtype=dtype, device=DEVICE)
    key, value = qkv[:, 80:320].view(9, 3, 80), qkv[:, 160:400].view(9, 3, 80)  # strided, as in the model
    slots = torch.tensor([0, 17, 191, -1, 33, 100, -1, 64, 5], device=DEVICE)
    store_kv(full[:, 1], key, value, slots)
    kept = slots >= 0
    write_kv(expected_full[:, 1], key[kept], value[kept], slots[kept])
    assert torch.equal(full, expected_full)
