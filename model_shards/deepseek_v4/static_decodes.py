"""A decode step of the pages with shapes fixed by its key, so that it can be a CUDA graph.

`DecodeBatch` (paged_decodes.py) sizes its tensors by the step: N decodes, C windows closing, D of
them ending a block, E_max (the widest request's entries), k = min(topk, E_max), the step's block
tables concatenated. `StaticDecodeBatch` runs the same layer code with every device tensor shaped
by a `StaticDecodeKey` (N bucket, context bucket) and the config alone:

    rows       N padded to a batch bucket (cuda_graphs.graph_batch_sizes); a padded row sits at
               position 0 of the scratch slot and the scratch window block, with no entries
    closing    every row pools a window every step, at every rate: a row whose window does not
               close reads and writes the scratch slot's window and writes its entry into the
               scratch compressed block (C = D = N); pooling is per row, so the real rows' entries
               are the ones the dynamic step computes
    entries    read up to context // m per row (HCA gather, the indexer's scores), masked past
               each row's count; k = min(topk, context // m) (= topk past 4 * topk tokens)
    tables     one persistent (rows, max blocks) device table of compressed block ids, a row per
               running request (its new ids copied once, cuda_graphs.DeviceBlockTables); the step
               names each decode's row instead of concatenating its table
    addresses  every int the step needs from the host (token ids, positions, slots, table rows,
               the blocks its window touches, per rate the closing windows' slots, entries and
               pages) in ONE host buffer, copied up at once (pinned, non-blocking) into a static
               device buffer of which every input is a view; masks and window addresses are
               derived from it on the device

The context bucket is the smallest power of two >= every row's position + 1 (at least a block):
a step reads at most twice the entries of the widest row per row, and the indexer's kernel skips
the tiles past each row's own count, so the extra work is its empty tiles and a top-k over the
wider block (docs/deepseek_v4.md, "A decode step as a CUDA graph").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.deepseek_v4.paged_decodes import DecodeBatch, PagedDecode
from model_shards.deepseek_v4.paged_state import PagedKV

RATE_FIELDS = ("counts", "pending_rows", "closing_slots", "entry_positions", "entry_blocks", "entry_rows",
               "block_end_windows")


@dataclass(frozen=True)
class StaticDecodeKey:
    """What fixes a static step's shapes: rows (a batch bucket) and the context its entries span."""

    rows: int
    context: int  # a power of two >= every row's position + 1, a multiple of the block size


def context_bucket(positions: list[int], block_size: int) -> int:
    """The smallest power of two holding every row's tokens (position + 1), at least one block."""
    widest = max(block_size, max(positions) + 1)
    return 1 << (widest - 1).bit_length()


@dataclass(frozen=True)
class Scratch:
    """Where the padded rows and the windows that do not close write: nothing real reads them."""

    slot: int  # an open-window slot of no request
    window_block: int  # a window block of no request
    compressed_block: int  # a compressed block of no request


@dataclass(frozen=True)
class DecodeShape:
    """The config-fixed sizes of a static step's inputs."""

    sliding_window: int
    block_size: int
    rates: tuple[int, ...]  # the compress rates with open windows (CSA, HCA)

    @property
    def window_span(self) -> int:
        """Window blocks one window can touch."""
        return -(-self.sliding_window // self.block_size) + 1


class StaticDecodeInputs:
    """The packed host buffer and its static device twin for one key; `fill` writes a step."""

    def __init__(self, key: StaticDecodeKey, shape: DecodeShape, scratch: Scratch, device: torch.device):
        self.key, self.shape, self.scratch = key, shape, scratch
        rows = key.rows
        sections = [("token_ids", (rows,)), ("positions", (rows,)), ("slots", (rows,)), ("table_rows", (rows,)),
                    ("window_tables", (rows, shape.window_span))]
        sections += [(f"{name}_{rate}", (rows,)) for rate in shape.rates for name in RATE_FIELDS]
        self._offsets, total = {}, 0
        for name, size in sections:
            count = size[0] * (size[1] if len(size) > 1 else 1)
            self._offsets[name] = (total, size)
            total += count
        self.host = torch.zeros(total, dtype=torch.long, pin_memory=device.type == "cuda")
        self.device_buffer = torch.zeros(total, dtype=torch.long, device=device)
        self.decodes: list[PagedDecode] = []
        self._copied: torch.cuda.Event | None = None  # the last copy up (GPU)

    def view(self, name: str) -> torch.Tensor:
        """A section of the device buffer (a view: the graph reads what `fill` copied there)."""
        offset, size = self._offsets[name]
        count = size[0] * (size[1] if len(size) > 1 else 1)
        return self.device_buffer[offset:offset + count].view(size)

    def fill(self, decodes: list[PagedDecode], token_ids: list[int], table_rows: list[int]) -> None:
        """Write the step of `decodes` (at most key.rows; their token ids and persistent table rows)
        into the host buffer, then ONE copy up (non-blocking from pinned memory on a GPU)."""
        if len(decodes) > self.key.rows or any(decode.position >= self.key.context for decode in decodes):
            raise ValueError(f"{len(decodes)} decodes do not fit the static step {self.key}")
        if self._copied is not None:  # the previous step's copy has read the host buffer
            self._copied.synchronize()
        self.decodes = decodes
        padding = self.key.rows - len(decodes)
        values = (self._pad(token_ids, 0, padding) + self._pad([d.position for d in decodes], 0, padding)
                  + self._pad([d.slot for d in decodes], self.scratch.slot, padding)
                  + self._pad(table_rows, 0, padding) + self._window_tables(decodes, padding))
        for rate in self.shape.rates:
            values += self._rate_values(decodes, rate, padding)
        self.host.copy_(torch.tensor(values, dtype=torch.long))
        self.device_buffer.copy_(self.host, non_blocking=True)
        if self.device_buffer.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    @staticmethod
    def _pad(values: list[int], filler: int, padding: int) -> list[int]:
        return list(values) + [filler] * padding

    def _window_tables(self, decodes: list[PagedDecode], padding: int) -> list[int]:
        """(rows, span) flat: the window blocks from each decode's oldest window key to its own,
        repeated last; the scratch window block for a padded row."""
        block, span, window = self.shape.block_size, self.shape.window_span, self.shape.sliding_window
        flat = []
        for decode in decodes:
            first = max(0, decode.position - window + 1) // block
            blocks = list(decode.tables[1][first:decode.position // block + 1])
            if min(blocks) < 0:
                raise RuntimeError("a decode's window reaches a freed window block")
            flat += blocks + blocks[-1:] * (span - len(blocks))
        return flat + [self.scratch.window_block] * (span * padding)

    def _rate_values(self, decodes: list[PagedDecode], rate: int, padding: int) -> list[int]:
        """RATE_FIELDS of every row at rate m, one after another; a row whose window does not
        close points its pooling at the scratch slot, block and window block."""
        per_block, scratch = self.shape.block_size // rate, self.scratch
        columns = {name: [] for name in RATE_FIELDS}
        for decode in decodes:
            position, (compressed, window) = decode.position, decode.tables
            entry = (position + 1) // rate - 1  # the entry this step's window becomes, if it closes
            closes = (position + 1) % rate == 0
            ends_block = closes and (entry + 1) % per_block == 0
            columns["counts"].append((position + 1) // rate)
            columns["pending_rows"].append(position % rate)
            columns["closing_slots"].append(decode.slot if closes else scratch.slot)
            columns["entry_positions"].append(entry * rate if closes else 0)
            columns["entry_blocks"].append(compressed[entry // per_block] if closes else scratch.compressed_block)
            columns["entry_rows"].append(entry % per_block if closes else 0)
            columns["block_end_windows"].append(window[entry // per_block] if ends_block else scratch.window_block)
        padded = {"closing_slots": scratch.slot, "entry_blocks": scratch.compressed_block,
                  "block_end_windows": scratch.window_block}
        return [value for name in RATE_FIELDS for value in self._pad(columns[name], padded.get(name, 0), padding)]

    def finish(self, pages: PagedKV) -> None:
        """After the step: each real decode's slot holds its windows after its token."""
        for decode in self.decodes:
            pages.open_windows.tokens[decode.slot] = decode.position + 1


class StaticRateAddresses:
    """RateAddresses (paged_decodes.py) of a static step: every row closes a window (C = D = N)."""

    def __init__(self, inputs: StaticDecodeInputs, rate: int):
        self.rate, self.per_block = rate, inputs.shape.block_size // rate
        self.widest = inputs.key.context // rate  # entries read per row
        self.counts_on_device = inputs.view(f"counts_{rate}")  # (N,)
        self.pending_rows = inputs.view(f"pending_rows_{rate}")  # (N,)
        self.closing_slots = inputs.view(f"closing_slots_{rate}")  # (N,) the scratch slot if not closing
        self.entry_positions = inputs.view(f"entry_positions_{rate}")  # (N,)
        self.entry_blocks = inputs.view(f"entry_blocks_{rate}")  # (N,)
        self.entry_rows = inputs.view(f"entry_rows_{rate}")  # (N,)
        self.block_end_windows = inputs.view(f"block_end_windows_{rate}")  # (N,) scratch if no block end
        self.block_ends = torch.arange(inputs.key.rows, device=self.pending_rows.device)  # (N,) every row


class StaticDecodeBatch(DecodeBatch):
    """A DecodeBatch whose tensors are views of `inputs` and ops on them, shaped by its key only:
    built once per key (inside the capture for a graph), it serves every step `inputs.fill` writes."""

    def __init__(self, pages: PagedKV, inputs: StaticDecodeInputs, tables: torch.Tensor):
        """`tables`: the persistent (table rows, max blocks) long device table of compressed block ids."""
        self.pages, self.inputs, self.rows = pages, inputs, None
        self.token_ids, self.token_positions = inputs.view("token_ids"), inputs.view("positions")  # (N,)
        self.slots = inputs.view("slots")  # (N,)
        self.new_key_blocks, self.new_key_rows, self.window_blocks, self.window_rows, self.window_allowed = \
            self._window(inputs.shape)
        self.compressed_table = tables.view(-1)  # one row space: row r of the table at r * max blocks
        self.table_offsets = inputs.view("table_rows") * tables.shape[1]  # (N,)
        self.rates = {rate: StaticRateAddresses(inputs, rate) for rate in inputs.shape.rates}
        self._entry_grids = {}

    def _window(self, shape: DecodeShape) -> tuple[torch.Tensor, ...]:
        """The new keys' (block, row) (N,) and the (N, W) window keys' blocks, rows and which exist,
        from the positions and the blocks each window touches: the dynamic step's host arithmetic."""
        block, window = shape.block_size, shape.sliding_window
        positions, tables = self.token_positions, self.inputs.view("window_tables")  # (N,), (N, span)
        first = (positions - window + 1).clamp(min=0) // block  # (N,) the first block touched
        keys = positions[:, None] - window + 1 + torch.arange(window, device=positions.device)  # (N, W)
        allowed, keys = keys >= 0, keys.clamp(min=0)
        blocks = tables.gather(1, keys // block - first[:, None])  # (N, W)
        new_blocks = tables.gather(1, (positions // block - first)[:, None])[:, 0]  # (N,)
        return new_blocks, positions % block, blocks, keys % block, allowed

    def finish(self) -> None:
        self.inputs.finish(self.pages)
