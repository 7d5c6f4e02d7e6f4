"""V4's attention core for one prefill chunk (window, HCA or CSA layer) as ONE flash-style Triton
kernel: the keys stream through an online softmax and no logit is ever written to memory.

`sink_attention` (the path the layers take) writes each block of queries' logits (t, heads, K),
runs the softmax kernel over them in place, and multiplies by the keys: at 1M tokens an HCA layer's
K is ~8,200 closed entries, so a 16K-token chunk writes and reads ~17 GB of logits a layer, several
times over. Here each program holds one query's heads (MQA: they share every key and its mask),
walks its window rows, then the HCA entries closed at its position, and writes (heads, head_dim).

    query i (position p = first + i):  window rows own - W + 1 .. own (those that exist),
                                        own = w + i in window_keys (w rows carried over)
                                        HCA entries 0 .. (p + 1) // rate - 1, or
                                        CSA entries selected[i] (-1: none)
    softmax over [sink logit | window logits | entry logits], the sink giving no value

Numerics follow `sink_attention`'s (transformers' eager attention): a logit is q . k rounded to
the input dtype, times the scale rounded again; the softmax runs in float32 from the sink on. As in
every flash kernel the probabilities multiply the keys before they are normalised (rounded to the
input dtype unnormalised), where the reference normalises first: outputs differ by that rounding.
HCA reads entries by row and CSA its top-k per query, both through the block table when they live
on pages (entries.py `addressed`), so neither is gathered into a copy first. Float32 inputs
multiply in IEEE float32 (a GPU's tl.dot defaults to TF32, 1e-3 off the reference); the others
on their tensor cores as given.

The layers run it for CSA layers on a GPU (`model.deepseek_v4_chunk_attention: auto`, the
default) and for every layer with `fused` (chunk_cores.py says why and what it measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.attention.triton_runtime import tl, triton
from model_shards.deepseek_v4.sink_attention import CompressedKeys


@dataclass(frozen=True)
class ChunkAttentionTiling:
    """A program: `heads` of `queries` consecutive queries (queries x heads rows, 16 at least:
    tl.dot's rows; CSA takes one query, its keys are its own) against `keys` keys a loop step.
    More queries a program read each window row and HCA entry for more rows (each key row loaded
    serves queries x heads rows: the kernel's arithmetic intensity).
    Registers bound it at head_dim 512: each row's float32 output and query (rows, 512) stay in
    registers. 32 rows and 16 keys spill nothing in any layer type (180-236 registers, ptxas for
    sm_90); 64 rows spill 56-456 bytes (2 queries x 32 heads: 128), CSA with 32 keys some too.
    The default, 64 heads x 32 keys, spills and is still the fastest of TILINGS in every layer
    type on an H200 (session 11, bench/deepseek_v4_chunk_attention.py): half the programs, each
    key loaded for twice the rows."""

    queries: int = 1
    heads: int = 64
    keys: int = 32
    warps: int = 8
    stages: int = 2


# What bench/deepseek_v4_chunk_attention.py times on a GPU (and the sm_90 compile test compiles).
TILINGS = {
    "64 heads, 32 keys, 8 warps": ChunkAttentionTiling(),
    "32 heads, 16 keys, 8 warps": ChunkAttentionTiling(heads=32, keys=16),
    "32 heads, 32 keys, 8 warps": ChunkAttentionTiling(heads=32),
    "64 heads, 16 keys, 8 warps": ChunkAttentionTiling(keys=16),
    "16 heads, 32 keys, 4 warps": ChunkAttentionTiling(heads=16, warps=4),
    "2 queries x 32 heads, 16 keys, 8 warps": ChunkAttentionTiling(queries=2, heads=32, keys=16),
    "4 queries x 16 heads, 16 keys, 8 warps": ChunkAttentionTiling(queries=4, heads=16, keys=16),
}


@triton.jit
def _online_step(q, keys, allowed, peak, total, acc, scale, PRECISION: tl.constexpr):
    """One block of keys (BN, D) into each row's running max (rows,), sum (rows,) and output (rows, D)."""
    logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION)  # (rows, BN)
    logits = logits.to(q.dtype).to(tl.float32)  # rounded as the reference's
    logits = (logits * scale).to(q.dtype).to(tl.float32)
    logits = tl.where(allowed, logits, float("-inf"))  # allowed: (rows, BN)
    new_peak = tl.maximum(peak, tl.max(logits, axis=1))
    decay = tl.exp(peak - new_peak)
    weights = tl.exp(logits - new_peak[:, None])
    total = total * decay + tl.sum(weights, axis=1)
    acc = acc * decay[:, None] + tl.dot(weights.to(keys.dtype), keys, input_precision=PRECISION)
    return new_peak, total, acc


WINDOW_ONLY, HCA_ENTRIES, CSA_ENTRIES = 0, 1, 2  # what a query sees after its window (ENTRIES)


@triton.jit
def _entry_keys(entries_ptr, table_ptr, rows, allowed, rows_per_block, stride_block, stride_row, dims):
    """Keys (BN, D) of entry rows through a block table (a contiguous tensor: one block), zero where
    not allowed."""
    rows = tl.where(allowed, rows, 0)
    block = tl.load(table_ptr + rows // rows_per_block, mask=allowed, other=0)
    address = block * stride_block + (rows % rows_per_block) * stride_row
    return tl.load(entries_ptr + address[:, None] + dims[None, :], mask=allowed[:, None], other=0.0)


# A chunk's lengths and offsets change with every step; left to Triton, each new combination of
# them being 1 or a multiple of 16 would compile another variant inside a request (the warm-up
# coverage test caught this once `auto` made the kernel the CSA layers' default).
LENGTHS = ["tokens", "carried", "first_position", "topk", "stride_selected"]


@triton.jit(do_not_specialize=LENGTHS)
def _chunk_attention(q_ptr, window_ptr, entries_ptr, table_ptr, selected_ptr, sink_ptr, out_ptr, tokens, heads,
                     carried, first_position, rate, topk, rows_per_block, scale, stride_q_token, stride_q_head,
                     stride_window, stride_block, stride_row, stride_selected, stride_out_token, stride_out_head,
                     WINDOW: tl.constexpr, DIM: tl.constexpr, BQ: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
                     ENTRIES: tl.constexpr, PRECISION: tl.constexpr):
    """A program: BQ consecutive queries x BH heads, one row each (BQ * BH rows), sharing every key
    they load: the queries' windows overlap and their HCA entries nearly coincide. CSA: BQ is 1."""
    first_query = tl.program_id(0) * BQ
    row = tl.arange(0, BQ * BH)
    query, head = first_query + row // BH, tl.program_id(1) * BH + row % BH
    real = (query < tokens) & (head < heads)
    last_query = tl.minimum(first_query + BQ, tokens) - 1
    dims, cols = tl.arange(0, DIM), tl.arange(0, BN)
    q = tl.load(q_ptr + query[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=real[:, None], other=0.0)  # (rows, D)
    peak = tl.load(sink_ptr + head, mask=real, other=0.0).to(tl.float32)  # the sink: exp(sink - peak) = 1
    total = peak * 0.0 + 1.0
    acc = tl.zeros([BQ * BH, DIM], dtype=tl.float32)
    own = carried + query  # (rows,) window_keys row of each row's query's own key
    last_own = carried + last_query
    for start in range(tl.maximum(carried + first_query - WINDOW + 1, 0), last_own + 1, BN):
        keys_row = start + cols
        keys = tl.load(window_ptr + keys_row[:, None] * stride_window + dims[None, :],
                       mask=(keys_row <= last_own)[:, None], other=0.0)
        allowed = (keys_row[None, :] <= own[:, None]) & (keys_row[None, :] > own[:, None] - WINDOW)
        peak, total, acc = _online_step(q, keys, allowed, peak, total, acc, scale, PRECISION)
    if ENTRIES == 1:  # HCA: every entry closed at the row's query's position
        visible = (first_position + query + 1) // rate  # (rows,)
        most = (first_position + last_query + 1) // rate
        for start in range(0, most, BN):
            keys_row = start + cols
            keys = _entry_keys(entries_ptr, table_ptr, keys_row, keys_row < most, rows_per_block, stride_block,
                               stride_row, dims)
            allowed = keys_row[None, :] < visible[:, None]  # (rows, BN)
            peak, total, acc = _online_step(q, keys, allowed, peak, total, acc, scale, PRECISION)
    if ENTRIES == 2:  # CSA: the indexer's top-k of the program's one query, -1 for none
        for start in range(0, topk, BN):
            picked = start + cols
            keys_row = tl.load(selected_ptr + first_query * stride_selected + picked, mask=picked < topk, other=-1)
            keys = _entry_keys(entries_ptr, table_ptr, keys_row, keys_row >= 0, rows_per_block, stride_block,
                               stride_row, dims)
            allowed = (keys_row >= 0)[None, :] & (row >= 0)[:, None]  # (rows, BN)
            peak, total, acc = _online_step(q, keys, allowed, peak, total, acc, scale, PRECISION)
    out = acc / total[:, None]
    tl.store(out_ptr + query[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def chunk_attention(q: torch.Tensor, window_keys: torch.Tensor, sliding_window: int,
                    compressed: CompressedKeys | None, sinks: torch.Tensor, scale: float,
                    tiling: ChunkAttentionTiling = ChunkAttentionTiling()) -> torch.Tensor:
    """`sink_attention` of one chunk: q (T, heads, D), window_keys (w + T, D), compressed None
    (window layers), HCA or CSA keys, contiguous or on pages -> (T, heads, D). D a power of two
    (512 on V4); the entries in q's dtype."""
    tokens, heads, dim = q.shape
    q, window_keys = _unit_last_stride(q), _unit_last_stride(window_keys)  # the kernel steps dims by 1
    mode, selected = WINDOW_ONLY, q.new_empty(1, 1, dtype=torch.long)
    blocks, table, rows_per_block = window_keys[None], selected.new_zeros(1), 1  # unread without entries
    if compressed is not None:
        if compressed.entries.dtype != q.dtype:
            raise ValueError(f"chunk_attention: entries in {compressed.entries.dtype}, queries in {q.dtype}")
        blocks, table, rows_per_block = compressed.entries.addressed()  # (blocks, rows, D), (blocks,), int
        mode = HCA_ENTRIES if compressed.selected is None else CSA_ENTRIES
        selected = selected if compressed.selected is None else _unit_last_stride(compressed.selected)
    out = torch.empty_like(q)
    head_block = max(16, min(tiling.heads, triton.next_power_of_2(heads)))  # tl.dot's rows: 16 at least
    queries = 1 if mode == CSA_ENTRIES else tiling.queries  # CSA: each query its own keys
    _chunk_attention[(triton.cdiv(tokens, queries), triton.cdiv(heads, head_block))](
        q, window_keys, blocks, table, selected, sinks, out, tokens, heads, window_keys.shape[0] - tokens,
        0 if compressed is None else compressed.first_position, 1 if compressed is None else compressed.rate,
        selected.shape[1], rows_per_block, scale, q.stride(0), q.stride(1), window_keys.stride(0), blocks.stride(0),
        blocks.stride(1), selected.stride(0), out.stride(0), out.stride(1),
        WINDOW=sliding_window, DIM=dim, BQ=queries, BH=head_block, BN=tiling.keys, ENTRIES=mode,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=tiling.warps, num_stages=tiling.stages)
    return out


def _unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
