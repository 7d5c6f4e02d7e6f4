"""One prefill chunk's attention over the paged cache, through kernels that plan per shape.

cuDNN's fused attention is the fastest causal kernel torch ships for Hopper, but it builds an
execution plan for every new (queries, keys) shape: 55-75 ms of host time each on an H200
(docs/measurements/session5-H200-vs_transformers-main.log: a new 4000-token prompt took 0.085 s,
the same length again 0.015 s), and its first non-causal call compiles a kernel (~0.8 s). A chunk of n
queries whose sequence already holds `prefix` cached tokens is split into pieces of few shapes:

    keys  0 ..................................... prefix-1 | prefix ...... prefix+n-1
          [ q*2^a ][ q*2^b ] ... [ q*2^z ][ rest < q ]     | the chunk itself
           no mask, pieces whose lengths are power-of-two  | causal, square: its own new K/V
           multiples of the quantum q (largest first),      | (no gather)
           then the unaligned rest

A piece runs on the planned kernel (cuDNN) only when its shape was planned at start-up in the
calling thread (`warm_shapes`: the chunks a lone long prompt brings under the step budget), its
queries padded up to their bucket (4 per octave) so that few shapes cover every chunk length. Any other piece
runs unpadded on a kernel without plans (FlashAttention-2): slower per FLOP on Hopper, but a plan
built inside a request would cost that request more than cuDNN saves it. Pieces merge exactly by
their log-sum-exp (model_shards/parallel/lse_attention.py). Each piece gathers only its own
blocks, once per layer: the chunk's own keys come straight from the projection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model_shards.attention.varlen_prefill import VarlenKernel
from model_shards.parallel.lse_attention import LseKernel, PartialSum

MIN_QUERY_BUCKET = 128
# A prompt alone runs in chunks of the step budget (planned, with their prefix pieces: cuDNN) and
# a last, shorter chunk. Short chunks stay on FlashAttention-2: on the H200 a 4000 / 8100-token
# prompt took 0.011 / 0.021 s on it against 0.015 / 0.025 s on cuDNN's warm plans, while from 130K
# on FlashAttention-2 alone took 1.4-1.6x cuDNN's TTFT (session 5, docs/benchmarks.md).
PLANNED_MIN_QUERIES = 16384  # causal chunks below this run unplanned, unless they fill the step
PLANNED_MIN_STEP = 4096  # step budgets below this plan nothing

PlanShape = tuple[int, int, bool]  # (padded queries, keys, causal)


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


def warm_shapes(step_tokens: int, max_model_len: int, quantum: int) -> list[PlanShape]:
    """The planned shapes that a prompt alone brings under a step budget of `step_tokens`: its
    full chunks (the budget's bucket) with their prefix pieces of quantum * 2^i keys below
    max_model_len, and causal chunks of the buckets from PLANNED_MIN_QUERIES up to the budget's."""
    top = bucket_tokens(step_tokens)
    if top < PLANNED_MIN_STEP:
        return []
    causal, bucket = [], bucket_tokens(PLANNED_MIN_QUERIES)
    while bucket < top:
        causal.append(bucket)
        bucket = bucket_tokens(bucket + 1)
    shapes = [(queries, queries, True) for queries in [*causal, top]]
    keys = quantum
    while keys < max_model_len:
        shapes.append((top, keys, False))
        keys *= 2
    return shapes


@dataclass
class PrefillKernels:
    """`planned` runs the shapes planned in the calling thread (cuDNN, plans built at start-up),
    `unplanned` any shape (flash). Without a plan-free kernel both are the planned one and every
    shape is padded to its bucket, so that plans stay few."""

    planned: LseKernel
    unplanned: LseKernel
    quantum: int  # tokens; a multiple of the block size
    # Several unplanned chunks of a step in one call (varlen_prefill.py); None: each on its own.
    varlen: VarlenKernel | None = None
    # cuDNN keeps its plans per thread (thread_local caches in aten/src/ATen/native/cudnn/MHA.cpp):
    # a shape planned in one thread would be planned again, inside a request, in another.
    _planned: dict[int, set[PlanShape]] = field(default_factory=dict)

    def mark_planned(self, shape: PlanShape) -> None:
        self._planned.setdefault(threading.get_ident(), set()).add(shape)

    def planned_here(self) -> set[PlanShape]:
        return self._planned.get(threading.get_ident(), set())

    def uses_plan(self, shape: PlanShape) -> bool:
        return shape in self.planned_here() or self.unplanned is self.planned

    def plans_a_piece_of(self, count: int, prefix_len: int) -> bool:
        """Whether chunk_attention runs some piece of a chunk of `count` queries over `prefix_len`
        cached keys on a shape planned in this thread (cuDNN at start-up): a long prompt's chunks."""
        bucket, planned = bucket_tokens(count), self.planned_here()
        return (bucket, bucket, True) in planned or any(
            length % self.quantum == 0 and (bucket, length, False) in planned
            for _, length in prefix_pieces(prefix_len, self.quantum))


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_cache: torch.Tensor,
                    block_ids: torch.Tensor, prefix_len: int, scale: float, kernels: PrefillKernels) -> torch.Tensor:
    """query (n, H, D) at positions prefix .. prefix + n - 1, key/value (n, KV, D) their own new
    K/V, block_ids the sequence's blocks (device, long) -> (n, H, D) in the query's dtype."""
    count = query.shape[0]
    bucket = bucket_tokens(count)
    key, value = key.contiguous(), value.contiguous()  # V is a strided view of the fused QKV
    pieces = prefix_pieces(prefix_len, kernels.quantum)
    causal_planned = kernels.uses_plan((bucket, bucket, True))
    pieces_planned = [length % kernels.quantum == 0 and kernels.uses_plan((bucket, length, False))
                      for _, length in pieces]
    padded_query = _pad_rows(query, bucket) if causal_planned or any(pieces_planned) else query
    if causal_planned:
        out, lse = kernels.planned(padded_query, _pad_rows(key, bucket), _pad_rows(value, bucket), scale, True)
    else:
        out, lse = kernels.unplanned(query, key, value, scale, True)
    if prefix_len == 0:
        return out[:count]
    merged = PartialSum(count, query.shape[1], query.shape[2], query.device)  # float32
    merged.add(0, out[:count], lse[:count])
    for (start, length), planned in zip(pieces, pieces_planned):
        piece_key, piece_value = gather_keys(layer_cache, block_ids, start, length)
        if planned:
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
    """(n, ...) -> (count, ...) contiguous, with zero rows after the n given ones. Contiguous
    always: cuDNN keys its plans by strides too, and V comes as a strided view of the fused QKV."""
    if rows.shape[0] == count:
        return rows.contiguous()
    return F.pad(rows, (0, 0, 0, 0, 0, count - rows.shape[0]))
