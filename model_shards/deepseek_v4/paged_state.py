"""A request's V4 state (state.py) read from and written through to the pages (kv_pages.py).

Before each chunk starting at token s, `PagedKV.load` builds the SequenceState the model runs on:

    window keys     tokens max(0, s - W + 1) .. s - 1 (W - 1 at most), gathered from the window pages
    entries         s // m closed entries per compressor, left where they lie: PagedEntries over the
                    compressed pages (entries.py), which the attention reads by address
    open windows    s on a block boundary: nothing pending, and CSA's overlap half from the
                    previous block's page (how a prefix hit, a restore or a preemption resumes);
                    inside a block: the request's slot of open windows (open_windows.py)
                    (the overlap halves live in the window block ending at the boundary: kv_pages.py)

(the block tables on the pools' device: a request's BlockTableMirror keeps them there between
steps, so a decode step copies no table, only the ids appended since its last step) and attaches
sinks, so that while the model runs every new window key and the overlap half at each block end
land in the request's pages (new entries write themselves: PagedEntries.append). After the chunk
`PagedKV.save` writes its open windows (bounded by m) into the request's slot: the pages stay the
one store of the growing KV, and no chunk copies it out whole. A decode step needs no
SequenceState at all: its requests' tokens run on the pages and slots directly (paged_decodes.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model_shards.deepseek_v4.entries import BlockRows, PagedEntries
from model_shards.deepseek_v4.kv_pages import PagePool
from model_shards.deepseek_v4.open_windows import OpenWindows
from model_shards.deepseek_v4.state import CompressorState, SequenceState
from model_shards.device import host_to_device


def ids_on_device(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """(len,) long on `device`; from pinned memory on a GPU, so the copy does not wait on the stream."""
    return host_to_device(torch.tensor(list(block_ids), dtype=torch.long), device)


class BlockTableMirror:
    """One of a request's block tables kept on the device between steps. Tables only grow (a
    freed window block stays in its table as -1), so each step copies only the ids appended
    since the last; a decode step, which rarely opens a block, copies none (rebuilding a
    1M-token table every token cost ~0.5 ms). Growth doubles the capacity, on the device."""

    def __init__(self, device: torch.device):
        self.table = torch.empty(0, dtype=torch.long, device=device)
        self.count = 0  # ids 0 .. count - 1 are on the device

    def update(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The table's (len(block_ids),) device tensor, copying only its new ids."""
        size = len(block_ids)
        if size > self.table.shape[0]:
            grown = torch.empty(max(64, 2 * size), dtype=torch.long, device=self.table.device)
            grown[:self.count] = self.table[:self.count]
            self.table = grown
        if size > self.count:  # rows the previous steps' kernels may still read stay untouched
            self.table[self.count:size] = ids_on_device(block_ids[self.count:size], self.table.device)
            self.count = size
        return self.table[:size]


class WindowPages:
    """WindowSink: the chunk's keys, at positions start .., into the window pages."""

    def __init__(self, view: torch.Tensor, rows: BlockRows, start: int):
        self.view, self.rows, self.next_position = view, rows, start

    def keys_appended(self, keys: torch.Tensor) -> None:
        self.rows.write(self.view, self.next_position, keys)
        self.next_position += keys.shape[0]


class OverlapPages:
    """CompressorSink of an overlapping (CSA) compressor: of the windows just closed, those that
    end a block leave their first half in that block's overlap fields (in the window pool: `table`
    is the window group's)."""

    def __init__(self, windows_per_block: int, overlap: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor):
        self.windows_per_block, self.overlap, self.table = windows_per_block, overlap, table

    def windows_closed(self, first_window: int, overlap_kv: torch.Tensor, overlap_gate: torch.Tensor) -> None:
        """overlap_kv / overlap_gate: (closed, m, dim) of windows first_window ..."""
        per_block = self.windows_per_block
        first_last = -(-(first_window + 1) // per_block) * per_block - 1  # first w with (w + 1) % per_block == 0
        if first_last >= first_window + overlap_kv.shape[0]:
            return
        # device aranges, not host lists: no copy from the host in the middle of a forward
        local = torch.arange(first_last - first_window, overlap_kv.shape[0], per_block, device=overlap_kv.device)
        blocks = self.table[(local + first_window + 1) // per_block - 1]
        kv_view, gate_view = self.overlap
        kv_view[blocks] = overlap_kv[local].to(kv_view.dtype)
        gate_view[blocks] = overlap_gate[local].to(gate_view.dtype)


class PagedKV:
    """Both pools of one rank and the requests' open windows, and the moves between them and a
    request's SequenceState."""

    def __init__(self, compressed: PagePool, window: PagePool, block_size: int):
        self.compressed, self.window, self.block_size = compressed, window, block_size
        self.open_windows = OpenWindows(compressed.device)

    def load(self, new_state: Callable[[], SequenceState], tables: Sequence[Sequence[int]], start: int,
             slot: int, device_tables: Sequence[torch.Tensor] | None = None) -> SequenceState:
        """The state after the request's first `start` tokens, with sinks into its pages.
        `tables`: (compressed, window) block tables; `slot`: its open windows (open_windows.py),
        read when `start` is inside a block; `device_tables`: the same tables already on the
        pools' device (else copied there now)."""
        inside_block = start % self.block_size != 0
        if inside_block and not self.open_windows.holds(slot, start):
            raise RuntimeError(f"a chunk starting at token {start}, inside a block, needs the request's open windows")
        state = new_state()
        state.num_tokens = start
        compressed_table, window_table = device_tables or [ids_on_device(t, self.compressed.device) for t in tables]
        # the window block ending at `start` (host int: indexing by a device scalar would wait on the GPU)
        previous = None if inside_block or start == 0 else tables[1][start // self.block_size - 1]
        for index, layer in enumerate(state.layers):
            self._load_window(index, layer.window, window_table, start)
            for name, compressor in (("", layer.compressor), ("index_", layer.indexer)):
                if compressor is not None:
                    self._load_compressor(index, name, compressor, (compressed_table, window_table), start,
                                          previous)
                    if inside_block:
                        self._load_open_window(index, name, compressor, slot)
        return state

    def _load_window(self, layer: int, window, table: torch.Tensor, start: int) -> None:
        view, rows = self.window.view(layer, "keys"), BlockRows(table, self.block_size)
        window.keys = rows.read(view, max(0, start - window.keep), start)
        window.sink = WindowPages(view, rows, start)

    def _load_compressor(self, layer: int, prefix: str, compressor: CompressorState,
                         tables: tuple[torch.Tensor, torch.Tensor], start: int, previous: int | None) -> None:
        """`previous`: the window block whose overlap halves a chunk at a block boundary resumes from."""
        compressed_table, window_table = tables
        per_block = self.block_size // compressor.rate
        entries = self.compressed.view(layer, "index_keys" if prefix else "entries")
        compressor.entries = PagedEntries(entries, BlockRows(compressed_table, per_block), start // compressor.rate)
        compressor.sink = None
        if (layer, prefix + "overlap_kv") in self.window.layout.fields:  # CSA: overlapping windows
            overlap = (self.window.view(layer, prefix + "overlap_kv"), self.window.view(layer, prefix + "overlap_gate"))
            if previous is not None:  # resume from the previous block's last window
                # copies, (m, dim) each: the slot may outlive the block
                compressor.overlap_kv, compressor.overlap_gate = overlap[0][previous].clone(), overlap[1][previous].clone()
            compressor.sink = OverlapPages(per_block, overlap, window_table)

    def _load_open_window(self, layer: int, prefix: str, compressor: CompressorState, slot: int) -> None:
        """Views of the slot's open window (the state replaces, never writes, its tensors; the slot
        is written back only after the chunk: `save`)."""
        windows = self.open_windows
        pending = windows.tokens[slot] % compressor.rate
        compressor.pending_kv = windows.view(layer, prefix + "pending_kv")[slot, :pending]
        compressor.pending_gate = windows.view(layer, prefix + "pending_gate")[slot, :pending]
        if windows.has(layer, prefix + "overlap_kv"):
            compressor.overlap_kv = windows.view(layer, prefix + "overlap_kv")[slot]
            compressor.overlap_gate = windows.view(layer, prefix + "overlap_gate")[slot]

    def save(self, state: SequenceState, slot: int) -> None:
        """Keep the request's open windows in its slot after a chunk run on `state` (the growing KV
        is in pages already); drop the state."""
        windows = self.open_windows
        for index, layer in enumerate(state.layers):
            for prefix, compressor in (("", layer.compressor), ("index_", layer.indexer)):
                if compressor is None:
                    continue
                pending = compressor.pending_kv.shape[0]
                windows.view(index, prefix + "pending_kv")[slot, :pending] = compressor.pending_kv
                windows.view(index, prefix + "pending_gate")[slot, :pending] = compressor.pending_gate
                if windows.has(index, prefix + "overlap_kv"):
                    self._save_overlap(index, prefix, compressor, slot)
        windows.tokens[slot] = state.num_tokens

    def _save_overlap(self, layer: int, prefix: str, compressor: CompressorState, slot: int) -> None:
        kv = self.open_windows.view(layer, prefix + "overlap_kv")
        gate = self.open_windows.view(layer, prefix + "overlap_gate")
        if compressor.overlap_kv is None:  # no window closed yet: the first one overlaps nothing
            kv[slot], gate[slot] = 0, float("-inf")
        else:
            kv[slot], gate[slot] = compressor.overlap_kv, compressor.overlap_gate
