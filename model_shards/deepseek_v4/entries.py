"""Where a compressor's entries lie, and the one way attention and the indexer read them.

A compressor's entries (CSA's attention entries, the Lightning Indexer's keys, HCA's entries)
are the one part of V4's state that grows with the context. Two places hold them:

    ContiguousEntries   one (E, dim) tensor, grown by concatenation: an in-memory SequenceState
                        (the model alone, the tests against transformers)
    PagedEntries        rows 0 .. count-1 of a page pool's (num_blocks, rows_per_block, dim) field
                        view, row r in block table[r // rows_per_block]: the engine's pages,
                        written in place as entries close and read where they lie

Both answer the same questions (`read` a run of rows, `gather` rows by index, `addressed` for a
kernel that follows the block table itself), so the attention code has one path: a chunk on the
pages copies no entry it does not use (CSA gathers each query's top-k by address, the indexer's
score kernel reads its keys through the table; only HCA's few entries, 1 per 128 tokens, are
read out whole). A contiguous tensor is addressed as one block holding every row.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

ONE_BLOCK_ROWS = 1 << 30  # rows of the one block a contiguous tensor is addressed as: more than any E

class BlockRows:
    """Row r of a field with `rows_per_block` rows per block, through one block table:
    block table[r // rows_per_block], row r % rows_per_block."""

    def __init__(self, table: torch.Tensor, rows_per_block: int):
        self.table, self.rows_per_block = table, rows_per_block  # table: (blocks,) long

    def locate(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, rows in them) of row indices of any shape."""
        return self.table[index // self.rows_per_block], index % self.rows_per_block

    def read(self, view: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """(stop - first, width) rows of a (num_blocks, rows, width) field view: whole blocks
        gathered at once (one index_select), then the rows cut out of them."""
        first_block, stop_block = first // self.rows_per_block, -(-stop // self.rows_per_block)
        blocks = view.index_select(0, self.table[first_block:stop_block])  # (blocks, rows, width)
        offset = first_block * self.rows_per_block
        return blocks.flatten(0, 1)[first - offset:stop - offset]

    def gather(self, view: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(..., width) rows of a (num_blocks, rows, width) field view at row indices (...): one
        integer op turns each index into a row address of `row_starts(view)`, then one index_select
        (whole rows of width contiguous elements, as a contiguous tensor's gather reads them)."""
        starts, block_step, row_step = row_starts(view)
        address = self.table[index // self.rows_per_block] * block_step + index % self.rows_per_block * row_step
        return starts.index_select(0, address.flatten()).view(*index.shape, view.shape[-1])

    def write(self, view: torch.Tensor, first: int, values: torch.Tensor) -> None:
        blocks, rows = self.locate(torch.arange(first, first + values.shape[0], device=self.table.device))
        view[blocks, rows] = values.to(view.dtype)


def row_starts(view: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Every row of a (num_blocks, rows, width) view as one (N, width) view, no copy, and the
    address steps of a block and of a row in it. Blocks sit a page apart (other fields between),
    so block stride S and row stride R need not make one uniform row stride: rows start every
    g = gcd(S, R) elements, so (N, width) rows at stride g (overlapping, read only) hold each
    row (b, j) at address b * S/g + j * R/g."""
    block_stride, row_stride, element_stride = view.stride()
    if element_stride != 1:
        raise ValueError(f"a field view's rows must be contiguous, got strides {view.stride()}")
    step = math.gcd(block_stride, row_stride)
    last_start = (view.shape[0] - 1) * block_stride + (view.shape[1] - 1) * row_stride
    starts = view.as_strided((last_start // step + 1, view.shape[2]), (step, 1))
    return starts, block_stride // step, row_stride // step


@dataclass(frozen=True)
class ContiguousEntries:
    rows: torch.Tensor  # (E, dim); never written in place, so snapshots may share it

    @property
    def count(self) -> int:
        return self.rows.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def head(self, count: int) -> ContiguousEntries:
        return ContiguousEntries(self.rows[:count])

    def read(self, first: int, stop: int) -> torch.Tensor:
        return self.rows[first:stop]  # a view

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """index (...) of rows < count -> (..., dim)."""
        return self.rows[index]

    def append(self, new: torch.Tensor) -> ContiguousEntries:
        return ContiguousEntries(torch.cat((self.rows, new))) if new.shape[0] else self

    def addressed(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(blocks (1, E, dim), table (1,), rows per block): one block holding every row. The
        block's rows and stride are constants, not E: kernels specialize on them (index_scores_kernel.py)
        and must not compile again as E grows; block 0 is the only one, so its stride is never used."""
        rows, dim = self.rows.shape
        one_block = self.rows.as_strided((1, rows, dim), (0, self.rows.stride(0), self.rows.stride(1)))
        return one_block, torch.zeros(1, dtype=torch.long, device=self.rows.device), ONE_BLOCK_ROWS


@dataclass(frozen=True)
class PagedEntries:
    view: torch.Tensor  # (num_blocks, rows_per_block, dim) typed view of one page field
    rows: BlockRows  # the request's block table over it
    count: int  # rows 0 .. count - 1 hold entries

    @property
    def dtype(self) -> torch.dtype:
        return self.view.dtype

    @property
    def nbytes(self) -> int:
        return self.count * self.view.shape[-1] * self.view.element_size()

    def head(self, count: int) -> PagedEntries:
        return dataclasses.replace(self, count=count)

    def read(self, first: int, stop: int) -> torch.Tensor:
        return self.rows.read(self.view, first, stop)  # a copy of those rows

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows.gather(self.view, index)

    def append(self, new: torch.Tensor) -> PagedEntries:
        """Write the new entries into their rows of the pages (the store of record)."""
        if not new.shape[0]:
            return self
        self.rows.write(self.view, self.count, new)
        return dataclasses.replace(self, count=self.count + new.shape[0])

    def addressed(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.view, self.rows.table, self.rows.rows_per_block


Entries = ContiguousEntries | PagedEntries
