"""One prefill chunk's attention over the paged cache, through kernels that plan per shape.

cuDNN's fused attention is the fastest causal kernel torch ships for Hopper, but it builds an
execution plan for every new (queries, keys) shape, ~70 ms of host time each (measured on an
H100), and every chunk of a long prompt used to bring a new key length. So a chunk of n queries
whose sequence already holds `prefix` cached tokens is split into pieces of few distinct shapes:

    keys  0 ..................................... prefix-1 | prefix ...... prefix+n-1
          [ q*2^a ][ q*2^b ] ... [ q*2^z ][ rest < q ]     | the chunk itself
           no mask, pieces whose lengths are power-of-two  | causal, square: its own new K/V
           multiples of the quantum q (largest first),      | (no gather), both sides padded to
           then the unaligned rest                          | the query bucket

Queries are padded up to a bucket (4 per octave), so the planned kernel sees (bucket, q*2^i)
and (bucket, bucket) shapes only: a bounded set, built once per process. The rest (< q keys,
a few percent of the work at most) goes to a kernel without plans (FlashAttention-2). Pieces
merge exactly by their log-sum-exp (model_shards/parallel/lse_attention.py). Each piece gathers
only its own blocks, once per layer: the chunk's own keys come straight from the projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_shards.parallel.lse_attention import LseKernel, PartialSum

MIN_QUERY_BUCKET = 128


def bucket_tokens(count: int, minimum: int = MIN_QUERY_BUCKET) -> int:
    """`count` rounded up to a multiple of 1/8 of its enclosing power of two (4 buckets per
    octave, at most 25% padding), at least `minimum`."""
    if count <= minimum:
        return minimum
    granule = 1 << max((count - 1).bit_length() - 3, 0)
    return -(-count // granule) * granule


def prefix_pieces(prefix_len: int, quantum: int) -> list[tuple[int, int]]:
    """(start, length) pieces covering keys [0, prefix_len): power-of-two multiples of `quantum`
    from the largest down, then the rest (< quantum) if any."""
    pieces, start = [], 0
    aligned = prefix_len // quantum
    for bit in reversed(range(aligned.bit_length())):
        if aligned >> bit & 1:
            length = quantum << bit
            pieces.append((start, length))
            start += length
    if start < prefix_len:
        pieces.append((start, prefix_len - start))
    return pieces


@dataclass(frozen=True)
class PrefillKernels:
    """`planned` runs bucketed shapes only (cuDNN); `unplanned` any shape (flash, or the same)."""

    planned: LseKernel
    unplanned: LseKernel
    quantum: int  # tokens; a multiple of the block size


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_cache: torch.Tensor,
                    block_ids: torch.Tensor, prefix_len: int, scale: float, kernels: PrefillKernels) -> torch.Tensor:
    """query (n, H, D) at positions prefix .. prefix + n - 1, key/value (n, KV, D) their own new
    K/V, block_ids the sequence's blocks (device, long) -> (n, H, D) in the query's dtype."""
    count = query.shape[0]
    bucket = bucket_tokens(count)
    padded_query = _pad_rows(query, bucket)
    out, lse = kernels.planned(padded_query, _pad_rows(key, bucket), _pad_rows(value, bucket), scale, True)
    if prefix_len == 0:
        return out[:count]
    merged = PartialSum(count, query.shape[1], query.shape[2], query.device)  # float32
    merged.add(0, out[:count], lse[:count])
    for start, length in prefix_pieces(prefix_len, kernels.quantum):
        piece_key, piece_value = gather_keys(layer_cache, block_ids, start, length)
        if length % kernels.quantum == 0:
            out, lse = kernels.planned(padded_query, piece_key, piece_value, scale, False)
        else:
            out, lse = kernels.unplanned(query, piece_key, piece_value, scale, False)
        merged.add(0, out[:count], lse[:count])
    return merged.out.to(query.dtype)


def gather_keys(layer_cache: torch.Tensor, block_ids: torch.Tensor, start: int,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions start .. start + length - 1, (length, KV, D) each, one copy
    (start is a multiple of the block size)."""
    block_size = layer_cache.shape[2]
    first, last = start // block_size, -(-(start + length) // block_size)
    ids = block_ids[first:last]  # (blocks,)
    keys = layer_cache[:, 0].index_select(0, ids).flatten(0, 1)[:length]  # (length, KV, D)
    values = layer_cache[:, 1].index_select(0, ids).flatten(0, 1)[:length]
    return keys, values


def _pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """(n, ...) -> (count, ...) with zero rows after the n given ones."""
    if rows.shape[0] == count:
        return rows
    return F.pad(rows, (0, 0, 0, 0, 0, count - rows.shape[0]))
