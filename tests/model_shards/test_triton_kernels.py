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
from model_shards.attention.triton_paged_decode import (choose_num_splits, paged_decode,  # noqa: E402
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, heads, kv_heads, head_dim, splits", [
    (16, 4, 4, 64, 1),  # no GQA, one split
    (16, 8, 2, 64, 3),  # GQA 4, splits that do not divide the tiles
    (32, 6, 1, 80, 4),  # GQA 6 (not a power of two), head_dim padded to 128
    (64, 32, 8, 128, 5),  # the 8B shape
    (128, 12, 4, 64, 2),  # two tiles per block
])
def test_paged_decode_matches_reference(dtype, block_size, heads, kv_heads, head_dim, splits):
    generator = torch.Generator().manual_seed(block_size * heads + splits)
    lengths = [1, block_size, 2 * block_size + 3, 5 * block_size - 1, 0]  # 0: an idle (padded) row
    cache = layer_view(40, block_size, kv_heads, head_dim, dtype, generator)
    tables = random_tables(lengths, 40, block_size, generator)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    query = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype=dtype, device=DEVICE)
    out = paged_decode(query, cache, tables, seq_lens, head_dim ** -0.5, splits)
    ref = paged_decode_reference(query, cache, tables, seq_lens, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == query.shape
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # no keys: exactly 0, not NaN


def test_split_count_changes_only_rounding():
    generator = torch.Generator().manual_seed(7)
    cache = layer_view(64, 16, 2, 64, torch.float16, generator)
    lengths = [300, 17]
    tables = random_tables(lengths, 64, 16, generator)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    query = torch.randn(2, 8, 64, generator=generator).to(dtype=torch.float16, device=DEVICE)
    one = paged_decode(query, cache, tables, seq_lens, 0.125, 1)
    many = paged_decode(query, cache, tables, seq_lens, 0.125, 7)  # more splits than tiles of row 1
    assert relative_error(many, one) < 2e-3


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


def test_num_splits_fill_the_gpu_but_not_past_the_tiles():
    assert choose_num_splits(1, 8, 131072, 132) == 64  # 66 wanted, capped at 64
    assert choose_num_splits(32, 8, 131072, 132) == 3  # 256 programs already: ~4 waves with 3
    assert choose_num_splits(1, 8, 100, 132) == 2  # 100 tokens are two 64-token tiles
    assert choose_num_splits(256, 8, 131072, 132) == 1


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
