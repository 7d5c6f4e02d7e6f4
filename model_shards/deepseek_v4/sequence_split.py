"""DeepSeek-V4 under sequence parallelism: a long prefill chunk's queries split over the SP ranks,
every request's state replicated on each of them.

Why not the dense models' layout (docs/parallelism.md: KV striped over the ranks, ring attention)?
V4 keeps one shared K = V head a token, compressed 4x (CSA) or 128x (HCA) beyond a 128-token
window: 6.5 KB a token at the flash shape, so every rank can hold every request's whole state
(1M tokens: ~7 GB), and the pieces of a chunk need only each other's KV-side projections, never a
pass over the context. Per layer, SP rank r:

  1. projects its own piece of the chunk (queries, kv, compressor and indexer inputs): 1/N of it;
  2. all-gathers the chunk's KV-side rows (kv, compressor kv / gate, indexer kv / gate: one
     collective of ~(D + 4 x width) values a token) and appends the WHOLE chunk to its replica of
     the state, as one rank would: each row was computed once, by its owner, so every replica
     gets the same bits;
  3. attends its own queries over that state (window rows, CSA top-k, HCA entries);
  4. runs the output projection, mHC and the experts on its own rows.

Attention per query costs about the same anywhere in a chunk (a 128-row window plus a top-k or a
few HCA entries), so contiguous pieces balance. Decodes and short chunks run whole on every rank:
a few tokens' MLP costs less than the collectives. Rank 0 takes the chunk's LAST piece, so the
row that is sampled lies on the rank that samples (world rank 0 is SP rank 0).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from model_shards.parallel.groups import ParallelGroup


@dataclass(frozen=True)
class ChunkPieces:
    """A chunk of `count` tokens cut into one contiguous piece per SP rank."""

    bounds: tuple[int, ...]  # piece p is the chunk's rows [bounds[p], bounds[p + 1])

    @classmethod
    def cut(cls, count: int, ranks: int) -> ChunkPieces:
        """Equal pieces, the remainder one row each to the last pieces."""
        base, extra = divmod(count, ranks)
        sizes = [base + (piece >= ranks - extra) for piece in range(ranks)]
        return cls(tuple(itertools.accumulate(sizes, initial=0)))

    @property
    def count(self) -> int:
        return self.bounds[-1]

    def rows_of(self, rank: int) -> tuple[int, int]:
        """(first, stop): the rows of the chunk that SP rank `rank` computes."""
        piece = piece_of(rank, len(self.bounds) - 1)
        return self.bounds[piece], self.bounds[piece + 1]


def piece_of(rank: int, ranks: int) -> int:
    """Rank 0 the last piece (it holds the sampled row), rank r >= 1 piece r - 1."""
    return (rank - 1) % ranks


@dataclass(frozen=True)
class SequenceSplit:
    """The step's split chunks as SP rank `group.rank` sees them: segment index (in the step's
    segment order) -> its pieces. Every rank builds the same one from the same schedule, so the
    collectives below run in the same order everywhere."""

    group: ParallelGroup
    pieces: dict[int, ChunkPieces]

    @classmethod
    def plan(cls, group: ParallelGroup, counts: list[int], min_tokens_per_rank: int) -> SequenceSplit | None:
        """Split each chunk of `counts` that gives every rank at least `min_tokens_per_rank` rows;
        None when there is nothing to split."""
        if group.size == 1:
            return None
        pieces = {index: ChunkPieces.cut(count, group.size) for index, count in enumerate(counts)
                  if count >= max(2, min_tokens_per_rank) * group.size}
        return cls(group, pieces) if pieces else None

    def rows(self, index: int) -> tuple[int, int]:
        """This rank's rows of segment `index`'s chunk (the whole chunk when it is not split)."""
        return self.pieces[index].rows_of(self.group.rank)

    def local_count(self, index: int, count: int) -> int:
        if index not in self.pieces:
            return count
        first, stop = self.rows(index)
        return stop - first

    def whole_chunks(self, local: torch.Tensor, rows: list[slice], indices: list[int]) -> list[torch.Tensor]:
        """`local` (this rank's rows, width): for each segment `indices[i]` (its rows `rows[i]`),
        the rows to append to its state: the whole chunk, gathered from every rank, where it is
        split; its own rows elsewhere. One collective for all split segments."""
        split = [i for i, index in enumerate(indices) if index in self.pieces]
        if not split:
            return [local[part] for part in rows]
        gathered = self._gather([local[rows[i]] for i in split], [indices[i] for i in split])
        whole = dict(zip(split, gathered))
        return [whole[i] if i in whole else local[part] for i, part in enumerate(rows)]

    def _gather(self, mine: list[torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
        """Each split segment's pieces from every rank, in row order: (count, width) each."""
        size = self.group.size
        sizes = [[stop - first for first, stop in (self.pieces[index].rows_of(rank) for index in indices)]
                 for rank in range(size)]  # sizes[rank][i]: rows rank holds of split segment i
        padded_rows = max(sum(row) for row in sizes)  # all_gather wants equal shapes
        local = torch.cat(mine)
        if local.shape[0] < padded_rows:
            local = torch.cat((local, local.new_zeros(padded_rows - local.shape[0], *local.shape[1:])))
        stacked = self.group.all_gather_stacked(local)  # (ranks, padded_rows, width)
        offsets = [list(itertools.accumulate(row, initial=0)) for row in sizes]
        ranks_in_row_order = sorted(range(size), key=lambda rank: piece_of(rank, size))
        return [torch.cat([stacked[rank, offsets[rank][i]:offsets[rank][i + 1]] for rank in ranks_in_row_order])
                for i in range(len(indices))]
