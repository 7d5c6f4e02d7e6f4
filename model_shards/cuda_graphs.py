"""Decode steps as CUDA graphs, one per batch-size bucket; one class owns every static buffer.

A decode step of B sequences (one new token each) pads to the smallest captured size >= B and
replays that graph: one launch for the whole forward pass instead of ~15 kernels per layer, each
a few microseconds of Python and driver time. Padded rows carry slot -1 (no KV write) and length
0 (no KV read, output 0), so they touch no sequence's blocks.

Block tables are the long part of a step's inputs (16K entries per 1M-token sequence at 64
tokens a block): each running request keeps one row of a persistent device table
(`DeviceBlockTables`) that grows by its new entries only, and a step gathers its rows into the
static table on the device. A step so copies O(B) integers from the host, in one pinned,
non-blocking copy, whatever the context lengths.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import repeat

import torch

from model_shards.attention.base import AttentionMetadata, table_width
from model_shards.device import host_to_device
from model_shards.kv_cache import KVCacheTensors


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, ... and the midpoints 3·2^k (6, 12, 24, ...) up to max_batch, which is
    always included: padding stays under a third, and decode, memory-bound on the weights and
    the KV cache, barely notices padded rows that read neither."""
    sizes = {max_batch}
    power = 1
    while power < max_batch:
        sizes.add(power)
        if power >= 4 and power * 3 // 2 < max_batch:
            sizes.add(power * 3 // 2)
        power *= 2
    return sorted(sizes)


def bucket_for(batch: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `batch` rows; None past the largest."""
    for size in sizes:
        if size >= batch:
            return size
    return None


class DeviceBlockTables:
    """One row of a persistent (max_rows, max_blocks) int32 (or `dtype`) device table per request."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device, dtype: torch.dtype = torch.int32):
        self.table = torch.zeros(max_rows, max_blocks, dtype=dtype, device=device)
        self._row_of: dict[str, int] = {}
        self._synced: dict[str, int] = {}  # entries of each row already on the device
        self._free_rows = list(range(max_rows - 1, -1, -1))

    def rows_for(self, request_ids: list[str], block_tables: list[list[int]]) -> list[int] | None:
        """Each request's row, after copying the entries it gained since the last call;
        None when the table has no free row or no room for a table (the caller runs eagerly)."""
        if any(len(table) > self.table.shape[1] for table in block_tables):
            return None
        if sum(rid not in self._row_of for rid in request_ids) > len(self._free_rows):
            return None
        rows = []
        # (row, column, block id) of every new entry, as three flat int64 arrays: C-level extends,
        # not a Python tuple per entry (a request's first graph step brings its whole table: 517
        # entries at 33K tokens, 31K for 60 requests joining at once, ~40 ms as tuples on the
        # H200 host, session 14's step anatomy).
        row_index, column_index, values = array("q"), array("q"), array("q")
        for request_id, block_table in zip(request_ids, block_tables):
            row = self._row(request_id)
            synced = self._synced[request_id]
            if synced < len(block_table):
                row_index.extend(repeat(row, len(block_table) - synced))
                column_index.extend(range(synced, len(block_table)))
                values.extend(block_table[synced:])
            self._synced[request_id] = len(block_table)
            rows.append(row)
        if values:
            updates = torch.frombuffer(row_index + column_index + values, dtype=torch.long).view(3, -1)
            row_index, column_index, values = host_to_device(updates, self.table.device)
            self.table.index_put_((row_index, column_index), values.to(self.table.dtype))
        return rows

    def release(self, request_id: str) -> None:
        """Forget a finished (or rebuilt) request; its row is reused."""
        row = self._row_of.pop(request_id, None)
        if row is not None:
            del self._synced[request_id]
            self._free_rows.append(row)

    def _row(self, request_id: str) -> int:
        if request_id not in self._row_of:
            self._row_of[request_id] = self._free_rows.pop()
            self._synced[request_id] = 0
        return self._row_of[request_id]


@dataclass
class DecodeRow:
    """One sequence of a decode step: its new token at `position`, and its block table."""

    request_id: str
    token_id: int
    position: int
    block_table: list[int]


@dataclass
class _StaticDecodeMetadata(AttentionMetadata):
    """Metadata whose tensors are the graph's static buffers; context_lens are only the
    capture-time bound (they size the RoPE table and the decode kernel's partials, never a result)."""

    static_seq_lens: torch.Tensor | None = None

    @property
    def seq_lens_tensor(self) -> torch.Tensor:
        return self.static_seq_lens


class DecodeGraphs:
    """Captures `model`'s decode forward at each bucket size; `run` replays the right one."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCacheTensors, max_batch: int,
                 max_model_len: int, max_requests: int):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = kv_cache.block_size
        self.max_model_len = max_model_len
        self.sizes = graph_batch_sizes(max_batch)
        max_blocks = table_width(-(-max_model_len // self.block_size))  # the eager steps' row stride rule
        self.tables = DeviceBlockTables(max_requests, max_blocks, self.device)
        size = self.sizes[-1]
        # (5, size) int64 per step from the host: token ids, positions, slots, lengths, table rows
        self.inputs = torch.zeros(5, size, dtype=torch.long, device=self.device)
        self.inputs[2].fill_(-1)  # warm-up and capture write no KV: every slot is padding
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=self.device)
        self.block_table = torch.zeros(size, max_blocks, dtype=torch.int32, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def capture(self) -> None:
        """Warm up, then capture every size, largest first, in one memory pool."""
        pool = None
        for size in reversed(self.sizes):
            metadata = self._metadata(size)
            for _ in range(2):  # compiles the Triton kernels and settles cuBLAS before capture
                self._forward(size, metadata)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size, metadata)
            pool = graph.pool()
            self.graphs[size] = graph

    def accepts(self, batch: int) -> bool:
        return bucket_for(batch, self.sizes) is not None

    def run(self, rows: list[DecodeRow]) -> torch.Tensor | None:
        """(len(rows), hidden) final hidden states, or None when this step cannot replay (more
        rows than the largest graph, or no free table row): the caller runs it eagerly."""
        size = bucket_for(len(rows), self.sizes)
        table_rows = None if size is None else self.tables.rows_for([r.request_id for r in rows],
                                                                   [r.block_table for r in rows])
        if table_rows is None:
            return None
        self._load_inputs(rows, table_rows, size)
        self.graphs[size].replay()
        return self.outputs[size][:len(rows)]

    def release(self, request_id: str) -> None:
        self.tables.release(request_id)

    def _load_inputs(self, rows: list[DecodeRow], table_rows: list[int], size: int) -> None:
        padding = size - len(rows)
        slots = [r.block_table[r.position // self.block_size] * self.block_size + r.position % self.block_size
                 for r in rows]
        host = torch.tensor([[r.token_id for r in rows] + [0] * padding,
                             [r.position for r in rows] + [0] * padding,
                             slots + [-1] * padding,
                             [r.position + 1 for r in rows] + [0] * padding,
                             table_rows + [0] * padding], dtype=torch.long)  # (5, size)
        inputs = self.inputs[:, :size]
        inputs.copy_(host_to_device(host, self.device))
        self.seq_lens[:size].copy_(inputs[3])
        torch.index_select(self.tables.table, 0, inputs[4], out=self.block_table[:size])

    def _metadata(self, size: int) -> _StaticDecodeMetadata:
        return _StaticDecodeMetadata(
            query_start_loc=list(range(size + 1)),
            context_lens=[self.max_model_len] * size,
            slot_mapping=self.inputs[2, :size],
            positions=self.inputs[1, :size],
            block_table_tensor=self.block_table[:size],
            block_size=self.block_size,
            static_seq_lens=self.seq_lens[:size],
        )

    def _forward(self, size: int, metadata: _StaticDecodeMetadata) -> torch.Tensor:
        return self.model(self.inputs[0, :size], self.inputs[1, :size], metadata, self.kv_cache)
