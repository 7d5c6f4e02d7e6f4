"""Ulysses sequence parallelism: prefill attention over a sequence-sharded prompt by all-to-all
over heads, the second SP mode beside the ring (ring.py).

Each of N ranks holds some rows (tokens) of one prompt, with every head. Attention mixes tokens
but never heads, so two all-to-alls turn the token split into a head split and back:

    q (R, H, D), k/v (R, KV, D)     this rank's R rows, all heads
      -- all-to-all -->  (n, H/N, D), (n, KV_r, D)   all n rows, this rank's heads
      -- causal attention over the whole prompt (one fused kernel call, no merges) -->
      (n, H/N, D)  -- all-to-all -->  (R, H, D)

Heads: query heads split evenly (a ValueError when N does not divide them); KV heads as
`ParallelGroup.head_shard` assigns them, so rank r's query heads all use KV heads it holds: with
KV >= N each rank gets KV/N of them, with KV < N each KV head is replicated on N/KV consecutive
ranks (and sent to each of them).

Row layout (`SequenceShards`): the op takes any split of the prompt's positions into per-rank
ranges. Both the contiguous split (rank r holds one run; no reordering) and the ring's zigzag
split (sp_plan.py; rank r holds pieces r and 2N-1-r) are provided. Ulysses' work does not depend
on the layout (every rank computes all n rows for H/N heads, so it is balanced for any split);
the zigzag split is what the engine's SP ranks hold and what `ring_attention` takes, so with it
Ulysses is a drop-in for the ring on the same local rows: the tests compare the two on identical
inputs, and the bench times them on identical inputs. Its only cost is one reorder of the
gathered rows into position order and one back (memory copies, next to a quadratic kernel).

One prompt per call (no varlen batch), fresh tokens only (no cached context: that would need the
log-sum-exp sent back too, as sp_attention.py does for the ring). The engine runs the ring; this
is an attention-level op with its tests and bench (docs/parallelism.md, "Ulysses").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

import torch

from model_shards.parallel.groups import ParallelGroup
from model_shards.parallel.lse_attention import LseKernel, attention_with_lse
from model_shards.parallel.sp_plan import zigzag_bounds

Ranges = tuple[tuple[int, int], ...]  # (start, stop) position ranges, in row order


@dataclass(frozen=True)
class SequenceShards:
    """Which positions of one prompt each rank holds: pieces[r] are rank r's ranges in its row
    order. Every rank builds the same object, so each knows every peer's row count."""

    pieces: tuple[Ranges, ...]

    @classmethod
    def contiguous(cls, length: int, size: int) -> SequenceShards:
        """Rank r holds one run of positions; the first length % size ranks hold one row more."""
        base, extra = divmod(length, size)
        starts = [r * base + min(r, extra) for r in range(size + 1)]
        return cls(tuple(((starts[r], starts[r + 1]),) for r in range(size)))

    @classmethod
    def zigzag(cls, length: int, size: int) -> SequenceShards:
        """The ring's split of a prefill chunk (sp_plan.py): rank r holds pieces r and 2N-1-r."""
        bounds = zigzag_bounds(length, size)
        return cls(tuple((bounds[r], bounds[2 * size - 1 - r]) for r in range(size)))

    @property
    def size(self) -> int:
        return len(self.pieces)

    @property
    def length(self) -> int:
        return sum(self.rows(rank) for rank in range(self.size))

    def rows(self, rank: int) -> int:
        return sum(stop - start for start, stop in self.pieces[rank])

    def positions_of(self, rank: int) -> list[int]:
        """Positions of rank's rows, in its row order."""
        return [p for start, stop in self.pieces[rank] for p in range(start, stop)]

    def in_order(self) -> bool:
        """Do the ranks' rows, concatenated in rank order, already run 0 .. n-1?"""
        ranges = [r for pieces in self.pieces for r in pieces if r[1] > r[0]]
        return all(a[1] == b[0] for a, b in pairwise(ranges))

    def gathered_positions(self, device: torch.device) -> torch.Tensor:
        """(n,) position of each row after the first all-to-all (every rank's rows, rank order)."""
        ranges = [r for pieces in self.pieces for r in pieces]
        return torch.cat([torch.arange(start, stop, device=device) for start, stop in ranges])


@dataclass(frozen=True)
class HeadSplit:
    """Per rank: the query heads and KV heads it attends for (slices of the full head axis)."""

    query: tuple[slice, ...]
    kv: tuple[slice, ...]

    @classmethod
    def of(cls, heads: int, kv_heads: int, group: ParallelGroup) -> HeadSplit:
        """Query heads split evenly; KV heads as ParallelGroup.head_shard places them, so that
        rank r's query heads h all use KV heads (h // (heads / kv_heads)) within its KV slice."""
        if heads % group.size:
            raise ValueError(f"Ulysses splits the {heads} query heads over {group.size} sequence-parallel "
                             f"ranks, so the rank count must divide them; use the ring otherwise")
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        per_rank = heads // group.size
        query = tuple(slice(r * per_rank, (r + 1) * per_rank) for r in range(group.size))
        return cls(query, tuple(_kv_slice(group, kv_heads, r) for r in range(group.size)))

    def width(self, rank: int) -> tuple[int, int]:
        """(query heads, KV heads) of `rank`: the same for every rank."""
        return self.query[rank].stop - self.query[rank].start, self.kv[rank].stop - self.kv[rank].start


def _kv_slice(group: ParallelGroup, kv_heads: int, rank: int) -> slice:
    index, count = replace(group, rank=rank).head_shard(kv_heads, "KV heads")  # count: KV shards in all
    width = kv_heads // count
    return slice(index * width, (index + 1) * width)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: SequenceShards,
                      group: ParallelGroup, scale: float, kernel: LseKernel) -> torch.Tensor:
    """q (R, H, D), k/v (R, KV, D): this rank's rows of one prompt (shards.pieces[group.rank])
    -> (R, H, D): their causal attention over the whole prompt. `kernel`: as the ring's, from
    lse_attention.select_kernel, but for the heads one rank attends with (HeadSplit.width)."""
    heads = HeadSplit.of(q.shape[1], k.shape[1], group)
    _check_rows(q.shape[0], shards, group)
    q_all, k_all, v_all = scatter_heads(q, k, v, shards, heads, group)
    out, _ = attention_with_lse(kernel, q_all, k_all, v_all, scale, causal=True)  # (n, H/N, D)
    return gather_heads(out, shards, group)


def _check_rows(rows: int, shards: SequenceShards, group: ParallelGroup) -> None:
    if shards.size != group.size:
        raise ValueError(f"shards of {shards.size} ranks given to a group of {group.size}")
    if rows != shards.rows(group.rank):
        raise ValueError(f"rank {group.rank} got {rows} rows, its shard has {shards.rows(group.rank)}")


def scatter_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: SequenceShards, heads: HeadSplit,
                  group: ParallelGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first all-to-all: this rank's rows, all heads -> all rows in position order, its heads:
    q (n, H/N, D), k/v (n, KV_r, D), each contiguous. q|k|v travel packed along the head axis,
    one message per peer (one collective's latency rather than three)."""
    query_width, kv_width = heads.width(group.rank)
    send = [torch.cat([q[:, heads.query[j]], k[:, heads.kv[j]], v[:, heads.kv[j]]], dim=1)  # (R, H/N + 2 KV_j, D)
            for j in range(group.size)]
    packed = q.new_empty((shards.length, query_width + 2 * kv_width, q.shape[2]))  # (n, ., D), rank order
    group.all_to_all(send, list(packed.split(_row_counts(shards))))  # receive into row views: no copy
    parts = packed.split([query_width, kv_width, kv_width], dim=1)
    if shards.in_order():
        return tuple(part.contiguous() for part in parts)
    positions = shards.gathered_positions(q.device)
    return tuple(_to_position_order(part, positions) for part in parts)


def _to_position_order(part: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    ordered = torch.empty(part.shape, dtype=part.dtype, device=part.device)  # contiguous (n, heads, D)
    ordered[positions] = part  # row i of the rank-order buffer holds position positions[i]
    return ordered


def gather_heads(out: torch.Tensor, shards: SequenceShards, group: ParallelGroup) -> torch.Tensor:
    """The second all-to-all: (n, H/N, D) of all rows in position order -> (R, H, D) of this
    rank's rows with every rank's heads (rank j's heads are heads j*H/N .. (j+1)*H/N)."""
    if not shards.in_order():
        out = out[shards.gathered_positions(out.device)]  # back to rank order: rank j's rows together
    send = list(out.split(_row_counts(shards)))  # (R_j, H/N, D) per peer, contiguous views
    rows = shards.rows(group.rank)
    received = out.new_empty((group.size, rows, *out.shape[1:]))  # (N, R, H/N, D): by source rank = head group
    group.all_to_all(send, list(received.unbind(0)))
    return received.transpose(0, 1).reshape(rows, group.size * out.shape[1], out.shape[2])  # (R, H, D)


def _row_counts(shards: SequenceShards) -> list[int]:
    return [shards.rows(rank) for rank in range(shards.size)]
