"""The fused Lightning Indexer score kernel (see index_scores.py for what it computes and why).

Program (i, j) owns queries i*BT .. and entries j*BE ..: it loads its BE keys once (entry e from
row e % rows_per_block of block table[e // rows_per_block]: the pages, or one block holding a
contiguous tensor), then for each head one (BT x dim) @ (dim x BE) tensor-core dot, ReLU, times
that head's per-query weight, summed into a (BT x BE) float32 accumulator. Only the summed scores reach memory, or straight away
their ranking keys (index_scores.py).

`_decode_index_scores` scores a decode step's N queries, one per request, each against its own
entries, in one launch. Program (i, j) owns query i and its entries j*BE ..: every request's
entries are one row space (row first_row[i] + e holds request i's entry e, found through one
block table), and the query's heads form the dot's rows: (heads x dim) @ (dim x BE), ReLU, times
the head weights, summed over heads. Columns past the request's count are -inf.
"""

from __future__ import annotations

import torch

from model_shards.attention.triton_runtime import tl, triton


# Lengths that change from chunk to chunk and block to block are not specialized on: Triton
# compiles a kernel again for each new value of an integer's "is a multiple of 16" (and "is 1"),
# which made chunks of a long prompt that met a new combination take 0.5-1.5 s of host time
# (docs/deepseek_v4.md, "Spike chunks"). They bound masks, positions and output rows only; strides
# set by the model's shape and the page layout (rows_per_block, stride_key_block: constant on pages
# and for contiguous entries, entries.py) stay specialized, so the key loads keep their vector width.
LENGTHS = ("tokens", "entries", "first_position", "stride_out_token")
DECODE_LENGTHS = ("columns", "stride_out_token")


@triton.jit(do_not_specialize=LENGTHS)
def _index_scores(
    q_ptr, weight_ptr, key_ptr, table_ptr, out_ptr, tokens, entries, first_position, rate, rows_per_block,
    stride_q_token, stride_q_head, stride_weight_token, stride_key_block, stride_key_row, stride_out_token,
    HEADS: tl.constexpr, DIM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, RANKED: tl.constexpr,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BE + tl.arange(0, BE)
    dims = tl.arange(0, DIM)
    row_ok, col_ok = rows < tokens, cols < entries
    visible = (first_position + rows + 1) // rate  # (BT,) entries closed at each query
    last_visible = (first_position + tl.minimum(tl.program_id(0) * BT + BT, tokens)) // rate
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    if tl.program_id(1) * BE < last_visible:  # else: every entry of the tile is still open
        block = tl.load(table_ptr + cols // rows_per_block, mask=col_ok, other=0).to(tl.int64)  # (BE,)
        key_rows = block * stride_key_block + (cols % rows_per_block) * stride_key_row  # entry -> its page row
        keys = tl.load(key_ptr + key_rows[:, None] + dims[None, :], mask=col_ok[:, None], other=0.0)
        for head in range(HEADS):
            q = tl.load(q_ptr + rows[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
                        mask=row_ok[:, None], other=0.0)  # (BT, DIM)
            weight = tl.load(weight_ptr + rows * stride_weight_token + head, mask=row_ok, other=0.0)  # (BT,)
            acc += tl.maximum(tl.dot(q, tl.trans(keys)), 0.0) * weight[:, None]
    acc = tl.where(cols[None, :] < visible[:, None], acc, float("-inf"))
    target = out_ptr + rows[:, None] * stride_out_token + cols[None, :]
    if RANKED:
        tl.store(target, _ranking_keys(acc, cols[None, :], entries), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(target, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _ranking_keys(scores, cols, entries):
    """index_scores.ranking_keys, in registers: scores float32 at columns `cols` of `entries`."""
    bits = tl.where(scores == 0.0, 0.0, scores).to(tl.int32, bitcast=True)  # -0.0 ranks as 0.0
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return (ordered << 32) | (entries - 1 - cols).to(tl.int64)


@triton.jit(do_not_specialize=DECODE_LENGTHS)
def _decode_index_scores(
    q_ptr, weight_ptr, key_ptr, table_ptr, first_row_ptr, count_ptr, out_ptr, columns, rows_per_block,
    stride_q_token, stride_q_head, stride_weight_token, stride_key_block, stride_key_row, stride_out_token,
    HEADS: tl.constexpr, HEADS_PADDED: tl.constexpr, DIM: tl.constexpr, BE: tl.constexpr, RANKED: tl.constexpr,
):
    query = tl.program_id(0)
    cols = tl.program_id(1) * BE + tl.arange(0, BE)
    heads, dims = tl.arange(0, HEADS_PADDED), tl.arange(0, DIM)
    count = tl.load(count_ptr + query)  # this request's entries
    col_ok = cols < count
    acc = tl.zeros((BE,), dtype=tl.float32)
    if tl.program_id(1) * BE < count:  # else: the tile is all padding
        row = tl.load(first_row_ptr + query) + cols  # (BE,) int64 rows of the shared row space
        block = tl.load(table_ptr + row // rows_per_block, mask=col_ok, other=0).to(tl.int64)
        key_rows = block * stride_key_block + (row % rows_per_block) * stride_key_row
        keys = tl.load(key_ptr + key_rows[:, None] + dims[None, :], mask=col_ok[:, None], other=0.0)  # (BE, DIM)
        head_ok = heads < HEADS
        q = tl.load(q_ptr + query * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
                    mask=head_ok[:, None], other=0.0)  # (HEADS_PADDED, DIM), padding heads 0
        weight = tl.load(weight_ptr + query * stride_weight_token + heads, mask=head_ok, other=0.0)
        acc = tl.sum(tl.maximum(tl.dot(q, tl.trans(keys)), 0.0) * weight[:, None], axis=0)
    acc = tl.where(col_ok, acc, float("-inf"))
    target = out_ptr + query * stride_out_token + cols
    if RANKED:
        tl.store(target, _ranking_keys(acc, cols, columns), mask=cols < columns)
    else:
        tl.store(target, acc, mask=cols < columns)


def launch_index_scores(q: torch.Tensor, head_weights: torch.Tensor,
                        keys: tuple[torch.Tensor, torch.Tensor, int], out: torch.Tensor,
                        first_position: int, rate: int, block_tokens: int, block_entries: int, warps: int) -> None:
    """Scores into `out` (t, E): float32 scores, or int64 ranking keys if out is int64. `keys`:
    (blocks (num_blocks, rows_per_block, dim), block table (blocks,) long, rows_per_block)."""
    tokens, heads, dim = q.shape
    blocks, table, rows_per_block = keys
    entries = out.shape[1]
    grid = (triton.cdiv(tokens, block_tokens), triton.cdiv(entries, block_entries))
    _index_scores[grid](
        q, head_weights, blocks, table, out, tokens, entries, first_position, rate, rows_per_block,
        q.stride(0), q.stride(1), head_weights.stride(0), blocks.stride(0), blocks.stride(1), out.stride(0),
        HEADS=heads, DIM=dim, BT=block_tokens, BE=block_entries, RANKED=out.dtype == torch.int64, num_warps=warps,
    )


def launch_decode_index_scores(q: torch.Tensor, head_weights: torch.Tensor,
                               keys: tuple[torch.Tensor, torch.Tensor, int], first_rows: torch.Tensor,
                               counts: torch.Tensor, out: torch.Tensor, block_entries: int, warps: int) -> None:
    """Scores into `out` (N, E_max) of N single queries q (N, heads, dim): query i against rows
    first_rows[i] .. + counts[i] - 1 of the shared row space `keys` (blocks, table, rows_per_block);
    float32 scores, or int64 ranking keys if out is int64."""
    queries, heads, dim = q.shape
    blocks, table, rows_per_block = keys
    grid = (queries, triton.cdiv(out.shape[1], block_entries))
    _decode_index_scores[grid](
        q, head_weights, blocks, table, first_rows, counts, out, out.shape[1], rows_per_block,
        q.stride(0), q.stride(1), head_weights.stride(0), blocks.stride(0), blocks.stride(1), out.stride(0),
        HEADS=heads, HEADS_PADDED=max(16, triton.next_power_of_2(heads)), DIM=dim, BE=block_entries,
        RANKED=out.dtype == torch.int64, num_warps=warps,
    )
