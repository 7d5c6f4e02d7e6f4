"""Writing the new tokens' K/V into the paged cache, as one Triton kernel.

One program per token moves its (kv_heads, head_dim) key and value rows to slot
`slot_mapping[t]` (block = slot // block_size, offset = slot % block_size). A negative slot is
skipped: CUDA-graph batches pad their unused rows with -1, so a padded row never touches a block
that a real sequence owns. The reference is `model_shards.attention.base.write_kv`.
"""

from __future__ import annotations

import torch

from model_shards.attention.triton_runtime import tl, triton


@triton.jit
def _store_kv(
    key_ptr, value_ptr, cache_ptr, slot_ptr, block_size, num_kv_heads, head_dim,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_kv, stride_cache_token, stride_cache_head,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS)
    dims = tl.arange(0, HEAD_DIM)
    slots = tl.zeros([HEADS], tl.int64) + slot  # (HEADS,): a tensor mask, not a scalar one
    mask = ((heads < num_kv_heads) & (slots >= 0))[:, None] & (dims[None, :] < head_dim)
    block = tl.maximum(slot, 0) // block_size
    offset = tl.maximum(slot, 0) % block_size
    target = (cache_ptr + block * stride_cache_block + offset * stride_cache_token
              + heads[:, None] * stride_cache_head + dims[None, :])  # (HEADS, HEAD_DIM)
    key = tl.load(key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :],
                    mask=mask)
    tl.store(target, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(target + stride_cache_kv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value (T, kv_heads, head_dim) into layer_cache (num_blocks, 2, block_size, kv_heads,
    head_dim) at slot_mapping (T,) int32/int64; slots < 0 are skipped. No host sync."""
    tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or slot_mapping.shape != (tokens,) or layer_cache.shape[3:] != key.shape[1:]:
        raise ValueError(f"store_kv: key {tuple(key.shape)}, value {tuple(value.shape)}, slots "
                         f"{tuple(slot_mapping.shape)} and cache {tuple(layer_cache.shape)} disagree")
    if key.stride(2) != 1 or value.stride(2) != 1 or layer_cache.stride(4) != 1:
        raise ValueError("store_kv: key, value and cache need a contiguous last dimension")
    if tokens == 0:
        return
    _store_kv[(tokens,)](
        key, value, layer_cache, slot_mapping, layer_cache.shape[2], num_kv_heads, head_dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        HEADS=triton.next_power_of_2(num_kv_heads), HEAD_DIM=triton.next_power_of_2(head_dim), num_warps=4,
    )
