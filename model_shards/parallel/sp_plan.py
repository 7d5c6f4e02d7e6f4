"""How one step's tokens and KV are split over N sequence-parallel ranks: host arithmetic only.

Two rules, both pure functions of positions, so that every rank derives every other rank's share
without asking (the step message is the same on all ranks):

Compute (zigzag). A prefill chunk of n > 1 new tokens is cut into 2N pieces; rank i computes
pieces i and 2N-1-i. Under a causal mask an early piece is cheap and a late one dear, so each
rank gets one of each and every ring step costs every rank the same (see ring.py). The remainder
of n / 2N goes to the last pieces, so piece 2N-1, which holds the sampled last token, is never
empty: SP rank 0 always holds every row that is sampled.

    chunk:   | p0 | p1 | p2 | p3 |      N = 2: rank 0 computes p0 + p3, rank 1 computes p1 + p2

A decode token (n == 1) is computed on every rank (replicated): it is one row, and every rank
needs its query anyway to attend over its own shard of the context.

Storage (striped). Position p's KV lives on rank p % N only, in local block block_table[p // B]
at offset (p % B) // N, where B is the scheduler's block size. Every rank's cache has blocks of
B / N slots under the same block ids as the scheduler's, so the driver's block tables, prefix
hashes and evictions work unchanged, each rank holds 1/N of every block, and a new decode token
lands on the rank with the fewest tokens of that sequence (p % N is that rank: round robin).
Ring steps write the positions a rank owns from each KV block that passes by: no extra traffic.

Local row order on a rank: its rows of the ring (prefill) sequences, in batch order, then the
decode rows, in batch order. The ring exchanges rows [0, R) as one buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepSequence:
    """One sequence of the step as the scheduler describes it."""

    block_table: list[int]
    computed: int  # tokens already in the cache
    num_new: int  # tokens computed this step

    @property
    def is_ring(self) -> bool:
        return self.num_new > 1


def zigzag_bounds(num_tokens: int, sp_size: int) -> list[tuple[int, int]]:
    """(start, stop) offsets of the 2N pieces of a chunk; the larger pieces come last."""
    pieces = 2 * sp_size
    base, extra = divmod(num_tokens, pieces)
    bounds, start = [], 0
    for piece in range(pieces):
        stop = start + base + (1 if piece >= pieces - extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def rank_pieces(seq: StepSequence, rank: int, sp_size: int) -> list[tuple[int, int]]:
    """Absolute position ranges that `rank` computes of this sequence, in its row order."""
    if not seq.is_ring:
        return [(seq.computed, seq.computed + 1)]
    bounds = zigzag_bounds(seq.num_new, sp_size)
    first, second = bounds[rank], bounds[2 * sp_size - 1 - rank]
    return [(seq.computed + first[0], seq.computed + first[1]),
            (seq.computed + second[0], seq.computed + second[1])]


def local_count(num_tokens: int, rank: int, sp_size: int) -> int:
    """How many of positions 0 .. num_tokens-1 live on `rank` (p % N == rank)."""
    return max(0, (num_tokens - rank + sp_size - 1) // sp_size)


def local_slots(block_table: list[int], positions: torch.Tensor, block_size: int, sp_size: int) -> torch.Tensor:
    """Slots in the local cache (blocks of block_size / N) of positions this rank owns."""
    if not positions.numel():
        return torch.empty(0, dtype=torch.long)
    first = int(positions.min()) // block_size  # only the blocks touched: a table can hold 4096+ ids
    table = torch.tensor(block_table[first:int(positions.max()) // block_size + 1], dtype=torch.long)
    return table[positions // block_size - first] * (block_size // sp_size) + (positions % block_size) // sp_size


def local_slot(block_table: list[int], position: int, block_size: int, sp_size: int) -> int:
    """local_slots of one position, in plain Python (a decode token: no tensor of the table)."""
    return block_table[position // block_size] * (block_size // sp_size) + (position % block_size) // sp_size


def _span(ranges: list[tuple[int, int]]) -> int:
    return sum(stop - start for start, stop in ranges)


def arange_of_ranges(ranges: list[tuple[int, int]]) -> torch.Tensor:
    parts = [torch.arange(start, stop) for start, stop in ranges]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class RingSequence:
    """A prefill chunk as this rank sees it in the ring."""

    seq: int  # index in the step's batch
    rows: tuple[int, int]  # its rows among this rank's ring rows
    first: int  # how many of them are this rank's first (early) piece
    src_rows: tuple[tuple[int, int], ...]  # per rank k: its rows in k's ring buffer
    src_first: tuple[int, ...]  # per rank k: the size of k's first piece
    computed: int  # context already cached (attended through the cache shards, not the ring)


@dataclass(frozen=True)
class DecodeSequence:
    seq: int
    row: int  # its row among the decode rows
    context_len: int  # computed + 1: the new token attends to itself too


@dataclass
class SequenceParallelPlan:
    """Everything rank `rank` of `size` needs to run one step's attention."""

    rank: int
    size: int
    block_size: int  # the scheduler's; local blocks hold block_size / size
    sequences: list[StepSequence]
    order: list[int]  # batch indices in local row order
    pieces: list[list[tuple[int, int]]]  # per local sequence: position ranges, in row order
    ring: list[RingSequence] = field(default_factory=list)
    ring_rows: list[int] = field(default_factory=list)  # per rank: ring buffer rows
    decode: list[DecodeSequence] = field(default_factory=list)

    @classmethod
    def build(cls, sequences: list[StepSequence], block_size: int, rank: int, size: int) -> SequenceParallelPlan:
        if block_size % size:
            raise ValueError(f"block_size {block_size} is not divisible by sequence parallel size {size}")
        ring_ids = [i for i, seq in enumerate(sequences) if seq.is_ring]
        order = ring_ids + [i for i, seq in enumerate(sequences) if not seq.is_ring]
        plan = cls(rank, size, block_size, sequences, order,
                   [rank_pieces(sequences[i], rank, size) for i in order])
        plan._place_ring(ring_ids)
        plan._place_decode([i for i in order if not sequences[i].is_ring])
        return plan

    def _place_ring(self, ring_ids: list[int]) -> None:
        offsets = [0] * self.size  # per rank: rows placed so far
        for i in ring_ids:
            seq = self.sequences[i]
            shares = [rank_pieces(seq, k, self.size) for k in range(self.size)]
            src_rows = tuple((offsets[k], offsets[k] + _span(shares[k])) for k in range(self.size))
            src_first = tuple(stop - start for (start, stop), _ in shares)
            self.ring.append(RingSequence(i, src_rows[self.rank], src_first[self.rank], src_rows, src_first,
                                          seq.computed))
            offsets = [stop for _, stop in src_rows]
        self.ring_rows = offsets

    def _place_decode(self, decode_ids: list[int]) -> None:
        for row, i in enumerate(decode_ids):
            seq = self.sequences[i]
            self.decode.append(DecodeSequence(i, row, seq.computed + 1))

    # --- what the worker and the model need --------------------------------------------------
    @property
    def num_rows(self) -> int:
        return sum(_span(ranges) for ranges in self.pieces)

    @property
    def num_ring_rows(self) -> int:
        return self.ring_rows[self.rank] if self.ring_rows else 0

    def positions(self) -> torch.Tensor:
        """(rows,) absolute position of each local row."""
        return torch.cat([arange_of_ranges(ranges) for ranges in self.pieces]) if self.pieces \
            else torch.empty(0, dtype=torch.long)

    def query_start_loc(self) -> list[int]:
        """Row offsets of each local sequence (in local order), as AttentionMetadata has them."""
        starts = [0]
        for ranges in self.pieces:
            starts.append(starts[-1] + _span(ranges))
        return starts

    def sample_row(self, local_index: int) -> int:
        """The row of a local sequence's last token (meaningful on SP rank 0 only)."""
        return self.query_start_loc()[local_index + 1] - 1

    # --- the writes of new KV into this rank's stripe ----------------------------------------
    def ring_writes(self, src: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of src's ring buffer that this rank owns, their local slots)."""
        rows, slots = [], []
        for ring in self.ring:
            seq = self.sequences[ring.seq]
            positions = arange_of_ranges(rank_pieces(seq, src, self.size))  # in src's row order
            mine = torch.nonzero(positions % self.size == self.rank).flatten()
            rows.append(mine + ring.src_rows[src][0])
            slots.append(local_slots(seq.block_table, positions[mine], self.block_size, self.size))
        return _cat_long(rows), _cat_long(slots)

    def decode_writes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(decode rows whose token this rank owns, their local slots)."""
        rows, slots = [], []
        for decode in self.decode:
            seq = self.sequences[decode.seq]
            if seq.computed % self.size == self.rank:
                rows.append(decode.row)
                slots.append(local_slot(seq.block_table, seq.computed, self.block_size, self.size))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(slots, dtype=torch.long)

    # --- the cached context of prefill chunks (chunked prefill, prefix-cache hits) -----------
    def cached_ring(self) -> list[RingSequence]:
        return [ring for ring in self.ring if ring.computed > 0]

    def cached_rows(self, rank: int) -> list[tuple[int, int]]:
        """Per cached ring sequence: its rows in `rank`'s buffer of cached-context queries."""
        bounds, start = [], 0
        for ring in self.cached_ring():
            size = ring.src_rows[rank][1] - ring.src_rows[rank][0]
            bounds.append((start, start + size))
            start += size
        return bounds


def _cat_long(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
