"""Paged decode attention as a Triton kernel (flash-decoding), with its plain-torch reference.

One query token per sequence attends to its whole paged context. A long context is split over
several programs (split-K), each writes a partial (out, log-sum-exp), and a second kernel merges
them exactly; one sequence with a long context so still fills every SM. Each program owns one
(sequence, KV head, split) and loads each K/V tile once for all the query heads of that KV head's
GQA group (they are the rows of one tl.dot), so the cache is read once.

How a sequence is split depends on its own length only (`DecodePlan`). Every (sequence, split)
is a work item; about four waves of programs per KV head take the items in turn, so a long
context among short ones spreads over every program, and a big batch of short contexts (a CUDA
graph's buffers are sized for `max_model_len`) launches no idle programs. Which program computes a
split changes nothing in it: a CUDA graph and an eager step cut every sequence at the same
places, reduce in the same order and agree bitwise, whatever the batch size and padded rows.

The cache is the layer view of model_shards/kv_cache.py, (num_blocks, 2, block_size, kv_heads,
head_dim) with any strides between blocks (the other layers sit there); the kernel reads the
block table directly: token t of a sequence lives in block table[t // block_size] at offset
t % block_size. A tile spans several blocks when blocks are smaller than the tile: their ids are
read as one vector.

Without CUDA the kernels run in Triton's interpreter (CPU tests; see triton_runtime.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model_shards.attention.triton_runtime import tl, triton

_LOG2_E = 1.4426950408889634
_MERGE_CHUNK = 16  # splits merged per iteration: (16, head_dim) float32 partials in registers
_SEQ_CHUNK = 64  # sequence lengths read per vector load when a program looks up its work item


@dataclass(frozen=True)
class DecodePlan:
    """How the kernel cuts and runs a sequence: a tile is `tile_tokens` tokens; a split is at least
    `min_split_tiles` tiles (short contexts: few programs, each worth its start-up) and there are at
    most `max_splits` of them (long contexts: a bounded merge). Chosen on an H200 by bench/gpu.py's
    decode sweep (docs/measurements/gpu_decode_sweep-H200.txt): at batch 1 x 8 KV heads, 64 splits
    read 128K tokens at 1.02x the copy rate, 128 splits at 0.98x, 32K tokens at 0.82x vs 0.71x.
    The launch aims at `waves` waves of programs over the SMs (programs_per_kv_head)."""

    max_splits: int = 64
    min_split_tiles: int = 4
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 4

    def splits_for(self, context_len: int) -> int:
        """The splits of one sequence of `context_len` tokens (the kernels compute the same)."""
        tiles = -(-context_len // self.tile_tokens)
        tiles_per_split = max(self.min_split_tiles, -(-tiles // self.max_splits))
        return -(-tiles // tiles_per_split)

    def split_slots(self, max_context_len: int) -> int:
        """Partials per (sequence, head) that hold every length up to max_context_len (the split
        count is not monotone in the length: past max_splits x min_split_tiles tiles it is
        max_splits or a little less)."""
        tiles = -(-max(max_context_len, 1) // self.tile_tokens)
        return max(1, min(self.max_splits, -(-tiles // self.min_split_tiles)))

    def programs_per_kv_head(self, max_context_len: int, num_seqs: int, num_kv_heads: int,
                             num_sms: int | None) -> int:
        """Programs per KV head: about `waves` waves over the SMs, no more than the (sequence,
        split) items there can be. Without an SM count: one program per possible item."""
        items = max(1, num_seqs) * self.split_slots(max_context_len)
        if num_sms is None:
            return items
        return max(1, min(items, -(-self.waves * num_sms // num_kv_heads)))


DEFAULT_PLAN = DecodePlan()


@triton.jit
def _split_range(seq_len, split, max_splits, min_split_tiles, TILE: tl.constexpr):
    """(first tile, end tile, splits) of `split` for a sequence of seq_len tokens: DecodePlan's rule."""
    num_tiles = tl.cdiv(seq_len, TILE)
    tiles_per_split = tl.maximum(min_split_tiles, tl.cdiv(num_tiles, max_splits))
    first_tile = split * tiles_per_split
    return first_tile, tl.minimum(first_tile + tiles_per_split, num_tiles), tl.cdiv(num_tiles, tiles_per_split)


@triton.jit
def _attend_tiles(query, head_base, table_row, seq_len, first_tile, end_tile, scale_log2, dim_mask,
                  stride_cache_block, stride_cache_kv, stride_cache_token,
                  BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Online softmax over tiles [first_tile, end_tile) of one sequence and KV head: (natural-log
    LSE (BLOCK_HEADS,), normalised output (BLOCK_HEADS, HEAD_DIM)); at least one tile."""
    running_max = tl.full([BLOCK_HEADS], float("-inf"), tl.float32)  # base-2 logits
    running_sum = tl.zeros([BLOCK_HEADS], tl.float32)
    accumulator = tl.zeros([BLOCK_HEADS, HEAD_DIM], tl.float32)
    tokens = tl.arange(0, TILE)
    for tile in range(first_tile, end_tile):
        # (TILE,) offsets of the tile's tokens in the layer cache (inline: the interpreter pays
        # for every nested call, and this runs per tile)
        token = tile * TILE + tokens
        valid = token < seq_len
        if BLOCK_SIZE >= TILE:  # the tile lies in one block: one table entry
            block_id = tl.load(table_row + tile * TILE // BLOCK_SIZE).to(tl.int64)
            offsets = block_id * stride_cache_block + (tile * TILE % BLOCK_SIZE + tokens) * stride_cache_token
        else:  # one entry per token, a vector load (entries repeat: block_size tokens share one)
            block_ids = tl.load(table_row + token // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            offsets = block_ids * stride_cache_block + (token % BLOCK_SIZE) * stride_cache_token
        load_mask = valid[:, None] & dim_mask[None, :]
        key = tl.load(head_base + offsets[:, None], mask=load_mask, other=0.0)  # (TILE, HEAD_DIM)
        value = tl.load(head_base + offsets[:, None] + stride_cache_kv, mask=load_mask, other=0.0)
        if UPCAST:
            key = key.to(tl.float32)
            value = value.to(tl.float32)
        scores = tl.dot(query, tl.trans(key)) * scale_log2  # (BLOCK_HEADS, TILE)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))  # finite: a tile holds >= 1 valid token
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        accumulator = accumulator * rescale[:, None] + tl.dot(probs.to(value.dtype), value)
        running_max = new_max
    return (running_max + tl.log2(running_sum)) / 1.4426950408889634, accumulator / running_sum[:, None]


@triton.jit
def _locate_item(item, seq_lens_ptr, num_seqs, max_splits, min_split_tiles, TILE: tl.constexpr,
                 SEQ_CHUNK: tl.constexpr):
    """(sequence, split) of work item `item`, items numbered sequence by sequence; also the total
    number of items. Reads the lengths SEQ_CHUNK at a time (a vector each), whatever the batch."""
    rows = tl.arange(0, SEQ_CHUNK)
    seq = tl.full([], 0, tl.int32)
    first_item = tl.full([], 0, tl.int32)
    items_before = tl.full([], 0, tl.int32)
    for start in range(0, num_seqs, SEQ_CHUNK):
        lens = tl.load(seq_lens_ptr + start + rows, mask=start + rows < num_seqs, other=0)
        tiles = tl.cdiv(lens, TILE)  # DecodePlan.splits_for, inline (a vector of lengths)
        splits = tl.cdiv(tiles, tl.maximum(min_split_tiles, tl.cdiv(tiles, max_splits)))  # (SEQ_CHUNK,)
        ends = items_before + tl.cumsum(splits, 0)  # each sequence's items end here
        done = ends <= item  # sequences wholly before the item
        seq += tl.sum(done.to(tl.int32), 0)
        first_item = tl.maximum(first_item, tl.max(tl.where(done, ends, 0), 0))
        items_before += tl.sum(splits, 0)
    return seq, item - first_item, items_before


@triton.jit(do_not_specialize=["num_seqs", "split_slots"])  # one binary for every batch: same bits
def _paged_decode_partials(
    query_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    scale_log2, num_seqs, split_slots, max_splits, min_split_tiles, head_dim,
    stride_query_seq, stride_query_head,
    stride_cache_block, stride_cache_kv, stride_cache_token, stride_cache_head,
    stride_table_seq,
    GROUP: tl.constexpr, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, UPCAST: tl.constexpr, SEQ_CHUNK: tl.constexpr,
):
    """Program (p, kv_head) computes work items p, p + P, p + 2P, ... of that KV head (P programs):
    item i is split i - first of its sequence, items numbered sequence by sequence. Every split
    of every sequence is one item, so a long context among short ones spreads over all programs
    and none idles; a split's result does not depend on which program computes it."""
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_programs = tl.num_programs(0)
    num_heads = tl.num_programs(1) * GROUP
    _, _, num_items = _locate_item(0, seq_lens_ptr, num_seqs, max_splits, min_split_tiles, TILE, SEQ_CHUNK)

    group_rows = tl.arange(0, BLOCK_HEADS)  # (BLOCK_HEADS,) query heads of this GQA group, padded
    heads = kv_head * GROUP + group_rows
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    dim_mask = dims < head_dim
    head_base = cache_ptr + kv_head * stride_cache_head + dims[None, :]
    for item in range(program, num_items, num_programs):
        seq, split, _ = _locate_item(item, seq_lens_ptr, num_seqs, max_splits, min_split_tiles, TILE, SEQ_CHUNK)
        seq_len = tl.load(seq_lens_ptr + seq)
        query = tl.load(query_ptr + seq * stride_query_seq + heads[:, None] * stride_query_head + dims[None, :],
                        mask=head_mask[:, None] & dim_mask[None, :], other=0.0)  # (BLOCK_HEADS, HEAD_DIM)
        if UPCAST:  # the interpreter multiplies bf16 as raw integers: compute in float32 there
            query = query.to(tl.float32)
        tiles_per_split = tl.maximum(min_split_tiles, tl.cdiv(tl.cdiv(seq_len, TILE), max_splits))  # as _split_range
        first_tile = split * tiles_per_split
        end_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(seq_len, TILE))
        lse, out = _attend_tiles(query, head_base, block_table_ptr + seq * stride_table_seq, seq_len, first_tile,
                                 end_tile, scale_log2, dim_mask, stride_cache_block, stride_cache_kv,
                                 stride_cache_token, BLOCK_HEADS, HEAD_DIM, BLOCK_SIZE, TILE, UPCAST)
        row = (seq * num_heads + heads) * split_slots + split  # (BLOCK_HEADS,)
        tl.store(partial_lse_ptr + row, lse, mask=head_mask)
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=head_mask[:, None])


@triton.jit(do_not_specialize=["split_slots"])
def _merge_partials(
    partial_out_ptr, partial_lse_ptr, seq_lens_ptr, out_ptr, split_slots, max_splits, min_split_tiles, head_dim,
    stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr,
):
    """One (sequence, head): its splits, CHUNK at a time in a fixed order (same bits whatever the
    grid), weighted by exp(lse - max lse). No split (seq_len 0): output 0."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    _, _, num_splits = _split_range(tl.load(seq_lens_ptr + seq), 0, max_splits, min_split_tiles, TILE)
    first_row = (seq * tl.num_programs(1) + head) * split_slots
    chunk = tl.arange(0, CHUNK)
    largest = tl.full([CHUNK], float("-inf"), tl.float32)
    for start in range(0, num_splits, CHUNK):
        lse = tl.load(partial_lse_ptr + first_row + start + chunk, mask=start + chunk < num_splits,
                      other=float("-inf"))
        largest = tl.maximum(largest, lse)
    largest_lse = tl.max(largest, 0)
    dims = tl.arange(0, HEAD_DIM)
    total = tl.zeros([CHUNK], tl.float32)
    accumulator = tl.zeros([CHUNK, HEAD_DIM], tl.float32)
    for start in range(0, num_splits, CHUNK):
        in_range = start + chunk < num_splits
        lse = tl.load(partial_lse_ptr + first_row + start + chunk, mask=in_range, other=float("-inf"))
        weights = tl.where(in_range, tl.exp(lse - largest_lse), 0.0)  # (CHUNK,)
        partials = tl.load(partial_out_ptr + (first_row + start + chunk[:, None]) * HEAD_DIM + dims[None, :],
                           mask=in_range[:, None], other=0.0)  # (CHUNK, HEAD_DIM)
        total += weights
        accumulator += partials * weights[:, None]
    out = tl.sum(accumulator, 0) / tl.maximum(tl.sum(total, 0), 1e-30)  # 0 / tiny = 0 for an idle row
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


def paged_decode(query: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, max_context_len: int,
                 plan: DecodePlan = DEFAULT_PLAN, num_sms: int | None = None) -> torch.Tensor:
    """query (S, heads, head_dim), layer_cache (num_blocks, 2, block_size, kv_heads, head_dim),
    block_table (S, max_blocks) int32/int64, seq_lens (S,) int32 (0: an idle row, output 0), every
    length <= max_context_len; num_sms: the device's SM count (sizes the grid). max_context_len and
    num_sms size buffers and the grid, never the result. -> (S, heads, head_dim) in the query's
    dtype. No host sync: CUDA-graph safe."""
    _check_inputs(query, layer_cache, block_table, seq_lens)
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    padded_dim = triton.next_power_of_2(head_dim)
    slots = plan.split_slots(max_context_len)
    partial_out = torch.empty(num_seqs, num_heads, slots, padded_dim, dtype=torch.float32, device=query.device)
    partial_lse = torch.empty(num_seqs, num_heads, slots, dtype=torch.float32, device=query.device)
    group = num_heads // num_kv_heads
    programs = plan.programs_per_kv_head(max_context_len, num_seqs, num_kv_heads, num_sms)
    _paged_decode_partials[(programs, num_kv_heads)](
        query, layer_cache, block_table, seq_lens, partial_out, partial_lse,
        scale * _LOG2_E, num_seqs, slots, plan.max_splits, plan.min_split_tiles, head_dim,
        query.stride(0), query.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2), layer_cache.stride(3),
        block_table.stride(0),
        GROUP=group, BLOCK_HEADS=max(16, triton.next_power_of_2(group)), HEAD_DIM=padded_dim,
        BLOCK_SIZE=block_size, TILE=plan.tile_tokens, UPCAST=not query.is_cuda, SEQ_CHUNK=_SEQ_CHUNK,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    out = torch.empty_like(query)
    _merge_partials[(num_seqs, num_heads)](
        partial_out, partial_lse, seq_lens, out, slots, plan.max_splits, plan.min_split_tiles, head_dim,
        out.stride(0), out.stride(1), HEAD_DIM=padded_dim, TILE=plan.tile_tokens, CHUNK=_MERGE_CHUNK, num_warps=4,
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
