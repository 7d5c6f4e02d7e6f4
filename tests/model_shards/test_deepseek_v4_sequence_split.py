"""The plan of DeepSeek-V4's sequence parallelism (model_shards/deepseek_v4/sequence_split.py):
which chunks are split, each rank's rows, and the reassembly of gathered pieces, with exact rows.
The collective is a stand-in that hands back every rank's padded rows as the real one would
(tests/parallel/test_deepseek_v4_parallel.py runs the engine on 2 gloo ranks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.deepseek_v4.sequence_split import ChunkPieces, SequenceSplit
from model_shards.parallel.groups import ParallelGroup


def test_pieces_are_contiguous_and_rank_0_holds_the_last_one():
    pieces = ChunkPieces.cut(11, 3)
    assert pieces.bounds == (0, 3, 7, 11)  # the remainder goes to the last pieces
    assert [pieces.rows_of(rank) for rank in range(3)] == [(7, 11), (0, 3), (3, 7)]


def test_only_chunks_that_give_every_rank_enough_rows_are_split():
    group = ParallelGroup(rank=1, size=2, ranks=(0, 1))
    split = SequenceSplit.plan(group, [1, 7, 8, 40], min_tokens_per_rank=4)
    assert sorted(split.pieces) == [2, 3]
    assert (split.rows(2), split.rows(3), split.local_count(0, 1), split.local_count(3, 40)) == ((0, 4), (0, 20), 1, 20)
    assert SequenceSplit.plan(group, [1, 1, 7], 4) is None
    assert SequenceSplit.plan(ParallelGroup.single(), [4096], 4) is None


@dataclass(frozen=True)
class StandInGroup:
    """all_gather_stacked over `size` ranks whose rows are given up front (this rank's included)."""

    rank: int
    size: int
    rows_of_rank: dict[int, torch.Tensor]

    def all_gather_stacked(self, local: torch.Tensor) -> torch.Tensor:
        assert torch.equal(local[: self.rows_of_rank[self.rank].shape[0]], self.rows_of_rank[self.rank])
        padded = [torch.cat((rows, rows.new_zeros(local.shape[0] - rows.shape[0], *rows.shape[1:])))
                  for _, rows in sorted(self.rows_of_rank.items())]
        return torch.stack(padded)


def test_whole_chunks_reassemble_every_split_segment_in_row_order_and_keep_the_others():
    """Segments: a decode (1 row, every rank), a 10-row chunk and a 7-row chunk split over 3
    ranks. Row values encode (segment, chunk row), so any misplaced row shows."""
    counts, ranks = [1, 10, 7], 3

    def local_rows(rank: int) -> tuple[torch.Tensor, list[slice]]:
        split = SequenceSplit(ParallelGroup(rank=rank, size=ranks, ranks=tuple(range(ranks))),
                              {1: ChunkPieces.cut(10, ranks), 2: ChunkPieces.cut(7, ranks)})
        pieces, slices, row = [], [], 0
        for index, count in enumerate(counts):
            first, stop = split.rows(index) if index in split.pieces else (0, count)
            pieces.append(torch.tensor([[100.0 * index + r, -r] for r in range(first, stop)]))
            slices.append(slice(row, row + stop - first))
            row += stop - first
        return torch.cat(pieces), slices

    everyone = {rank: local_rows(rank) for rank in range(ranks)}
    split_rows = {rank: torch.cat([local[part] for part in parts[1:]]) for rank, (local, parts) in everyone.items()}
    for rank in range(ranks):
        group = StandInGroup(rank, ranks, split_rows)
        split = SequenceSplit(group, {1: ChunkPieces.cut(10, ranks), 2: ChunkPieces.cut(7, ranks)})
        local, parts = everyone[rank]
        whole = split.whole_chunks(local, parts, [0, 1, 2])
        assert whole[0].tolist() == [[0.0, 0.0]]
        assert whole[1].tolist() == [[100.0 + r, -r] for r in range(10)]
        assert whole[2].tolist() == [[200.0 + r, -r] for r in range(7)]
