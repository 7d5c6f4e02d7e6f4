"""Paged decode attention as a Triton kernel (flash-decoding), with its plain-torch reference.

One query token per sequence attends to its whole paged context. The keys of a long context are
split over `num_splits` programs (split-K), each writes a partial (out, log-sum-exp), and a
second kernel merges them exactly; a short batch of long contexts so still fills every SM.
Each program owns one (sequence, KV head, split) and loads each K/V tile once for all the query
heads of that KV head's GQA group (they are the rows of one tl.dot), so the cache is read once.

The cache is the layer view of model_shards/kv_cache.py, (num_blocks, 2, block_size, kv_heads,
head_dim) with any strides between blocks (the other layers sit there); the kernel reads the
block table directly: token t of a sequence lives in block table[t // block_size] at offset
t % block_size.

Without CUDA the kernels run in Triton's interpreter (CPU tests; see triton_runtime.py).
"""

from __future__ import annotations

import math

import torch

from model_shards.attention.triton_runtime import tl, triton

# Tokens per K/V tile: a divisor of the block size, at most one (64, head_dim) tile of K and one
# of V in registers per iteration.
_MAX_TILE_TOKENS = 64
_MAX_SPLITS = 64
_LOG2_E = 1.4426950408889634


@triton.jit
def _paged_decode_partials(
    query_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    scale_log2, num_splits, head_dim,
    stride_query_seq, stride_query_head,
    stride_cache_block, stride_cache_kv, stride_cache_token, stride_cache_head,
    stride_table_seq,
    GROUP: tl.constexpr, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)

    group_rows = tl.arange(0, BLOCK_HEADS)  # (BLOCK_HEADS,) query heads of this GQA group, padded
    heads = kv_head * GROUP + group_rows
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    dim_mask = dims < head_dim
    query = tl.load(query_ptr + seq * stride_query_seq + heads[:, None] * stride_query_head + dims[None, :],
                    mask=head_mask[:, None] & dim_mask[None, :], other=0.0)  # (BLOCK_HEADS, HEAD_DIM)
    if UPCAST:  # the interpreter multiplies bf16 as raw integers: compute in float32 there
        query = query.to(tl.float32)

    running_max = tl.full([BLOCK_HEADS], float("-inf"), tl.float32)  # base-2 logits
    running_sum = tl.zeros([BLOCK_HEADS], tl.float32)
    accumulator = tl.zeros([BLOCK_HEADS, HEAD_DIM], tl.float32)
    tokens = tl.arange(0, TILE)
    for tile in range(first_tile, last_tile):
        position = tile * TILE
        block_id = tl.load(block_table_ptr + seq * stride_table_seq + position // BLOCK_SIZE).to(tl.int64)
        base = (cache_ptr + block_id * stride_cache_block + kv_head * stride_cache_head
                + (position % BLOCK_SIZE + tokens[:, None]) * stride_cache_token + dims[None, :])
        key = tl.load(base, mask=dim_mask[None, :], other=0.0)  # (TILE, HEAD_DIM)
        value = tl.load(base + stride_cache_kv, mask=dim_mask[None, :], other=0.0)
        if UPCAST:
            key = key.to(tl.float32)
            value = value.to(tl.float32)
        scores = tl.dot(query, tl.trans(key)) * scale_log2  # (BLOCK_HEADS, TILE)
        scores = tl.where((position + tokens < seq_len)[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))  # finite: a tile holds >= 1 valid token
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        accumulator = accumulator * rescale[:, None] + tl.dot(probs.to(value.dtype), value)
        running_max = new_max

    # Natural-log LSE; an empty split (-inf) gets weight 0 in the merge.
    empty = running_sum == 0.0
    lse = tl.where(empty, float("-inf"), (running_max + tl.log2(tl.where(empty, 1.0, running_sum))) / 1.4426950408889634)
    out = accumulator / tl.where(empty, 1.0, running_sum)[:, None]
    row = (seq * num_heads + heads) * num_splits + split  # (BLOCK_HEADS,)
    tl.store(partial_lse_ptr + row, lse, mask=head_mask)
    tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=head_mask[:, None])


@triton.jit
def _merge_partials(
    partial_out_ptr, partial_lse_ptr, out_ptr, num_splits, head_dim,
    stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, SPLITS)
    split_mask = splits < num_splits
    lse = tl.load(partial_lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    largest = tl.max(lse, 0)
    largest = tl.where(largest == float("-inf"), 0.0, largest)  # no key at all: every weight 0
    weights = tl.exp(lse - largest)  # (SPLITS,)
    total = tl.sum(weights, 0)
    dims = tl.arange(0, HEAD_DIM)
    partials = tl.load(partial_out_ptr + (row * num_splits + splits[:, None]) * HEAD_DIM + dims[None, :],
                       mask=split_mask[:, None], other=0.0)  # (SPLITS, HEAD_DIM)
    out = tl.sum(partials * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                      tile_tokens: int = _MAX_TILE_TOKENS) -> int:
    """Splits per (sequence, KV head): enough programs for ~4 waves over the SMs, never more
    splits than tiles of the longest context, at most 64 (the merge reads them all)."""
    programs = num_seqs * num_kv_heads
    wanted = -(-4 * num_sms // max(programs, 1))
    tiles = max(1, -(-max_context_len // tile_tokens))
    return max(1, min(wanted, tiles, _MAX_SPLITS))


def paged_decode(query: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, num_splits: int) -> torch.Tensor:
    """query (S, heads, head_dim), layer_cache (num_blocks, 2, block_size, kv_heads, head_dim),
    block_table (S, max_blocks) int32/int64, seq_lens (S,) int32 (0: an idle row, output 0)
    -> (S, heads, head_dim) in the query's dtype. No host sync: CUDA-graph safe."""
    _check_inputs(query, layer_cache, block_table, seq_lens)
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    padded_dim = triton.next_power_of_2(head_dim)
    partial_out = torch.empty(num_seqs, num_heads, num_splits, padded_dim, dtype=torch.float32,
                              device=query.device)
    partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    group = num_heads // num_kv_heads
    _paged_decode_partials[(num_seqs, num_kv_heads, num_splits)](
        query, layer_cache, block_table, seq_lens, partial_out, partial_lse,
        scale * _LOG2_E, num_splits, head_dim,
        query.stride(0), query.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        block_table.stride(0),
        GROUP=group, BLOCK_HEADS=max(16, triton.next_power_of_2(group)), HEAD_DIM=padded_dim,
        BLOCK_SIZE=block_size, TILE=min(block_size, _MAX_TILE_TOKENS), UPCAST=not query.is_cuda,
        num_warps=4, num_stages=2,
    )
    out = torch.empty_like(query)
    _merge_partials[(num_seqs, num_heads)](
        partial_out, partial_lse, out, num_splits, head_dim, out.stride(0), out.stride(1),
        HEAD_DIM=padded_dim, SPLITS=triton.next_power_of_2(num_splits), num_warps=4,
    )
    return out


def supports(block_size: int, head_dim: int, num_heads: int, num_kv_heads: int) -> str | None:
    """None when the kernel runs this shape, else why not."""
    if block_size < 16 or block_size & (block_size - 1):
        return f"block_size {block_size} is not a power of two >= 16"
    if head_dim > 256:
        return f"head_dim {head_dim} > 256"
    if num_heads % num_kv_heads:
        return f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    return None


def _check_inputs(query: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor) -> None:
    if query.dim() != 3 or layer_cache.dim() != 5 or layer_cache.shape[1] != 2:
        raise ValueError(f"query (S, H, D) and layer_cache (blocks, 2, block_size, KV, D) expected, got "
                         f"{tuple(query.shape)} and {tuple(layer_cache.shape)}")
    reason = supports(layer_cache.shape[2], query.shape[2], query.shape[1], layer_cache.shape[3])
    if reason:
        raise ValueError(f"paged_decode: {reason}")
    if query.stride(2) != 1 or layer_cache.stride(4) != 1:
        raise ValueError("paged_decode: query and cache need a contiguous last dimension")
    if query.dtype != layer_cache.dtype or (query.is_cuda and query.dtype == torch.float32):
        raise ValueError(f"paged_decode: query {query.dtype} and cache {layer_cache.dtype} must be the "
                         f"same half-precision dtype on CUDA")
    if block_table.shape[0] != query.shape[0] or seq_lens.shape != (query.shape[0],):
        raise ValueError("paged_decode: one block-table row and one length per query row")
    if seq_lens.dtype != torch.int32 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("paged_decode: seq_lens must be int32 and block_table int32 or int64")


def paged_decode_reference(query: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same function in plain torch, float32, one sequence at a time (tests only)."""
    out = torch.zeros_like(query)
    block_size, num_kv_heads = layer_cache.shape[2], layer_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    for seq, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        blocks = block_table[seq, :math.ceil(seq_len / block_size)].long()
        keys = layer_cache[blocks, 0].flatten(0, 1)[:seq_len].float()  # (L, KV, D)
        values = layer_cache[blocks, 1].flatten(0, 1)[:seq_len].float()
        q = query[seq].float().view(num_kv_heads, group, -1)  # (KV, G, D)
        probs = (torch.einsum("kgd,lkd->kgl", q, keys) * scale).softmax(dim=-1)
        out[seq] = torch.einsum("kgl,lkd->kgd", probs, values).reshape(query.shape[1:]).to(query.dtype)
    return out
