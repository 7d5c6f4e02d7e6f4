"""A request's V4 state (state.py) read from and written through to the pages (kv_pages.py).

Before each chunk starting at token s, `PagedKV.load` builds the SequenceState the model runs on:

    window keys     tokens max(0, s - W + 1) .. s - 1, gathered from the window pages
    entries         every closed entry (s // m of them) per compressor, gathered from the compressed pages
    open windows    s on a block boundary: nothing pending, and CSA's overlap half from the
                    previous block's page (how a prefix hit, a restore or a preemption resumes);
                    inside a block: the request's slot (the state after its previous chunk)
                    (the overlap halves live in the window block ending at the boundary: kv_pages.py)

and attaches sinks, so that while the model runs every new window key, every new entry and the
overlap half at each block end land in the request's pages. After the chunk `PagedKV.slot` keeps
only the open windows (bounded by m): the pages stay the one store of the growing KV.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model_shards.deepseek_v4.kv_pages import PagePool
from model_shards.deepseek_v4.state import CompressorState, SequenceState


class BlockRows:
    """Row r of a field with `rows_per_block` rows per block, through one block table:
    block table[r // rows_per_block], row r % rows_per_block."""

    def __init__(self, table: torch.Tensor, rows_per_block: int):
        self.table, self.rows_per_block = table, rows_per_block  # table: (blocks,) long

    def address(self, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(first, stop, device=self.table.device)
        return self.table[rows // self.rows_per_block], rows % self.rows_per_block

    def read(self, view: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """(stop - first, width) rows of a (num_blocks, rows, width) field view: whole blocks
        gathered at once (one index_select), then the rows cut out of them."""
        first_block, stop_block = first // self.rows_per_block, -(-stop // self.rows_per_block)
        blocks = view.index_select(0, self.table[first_block:stop_block])  # (blocks, rows, width)
        offset = first_block * self.rows_per_block
        return blocks.flatten(0, 1)[first - offset:stop - offset]

    def write(self, view: torch.Tensor, first: int, values: torch.Tensor) -> None:
        blocks, rows = self.address(first, first + values.shape[0])
        view[blocks, rows] = values.to(view.dtype)


class WindowPages:
    """WindowSink: the chunk's keys, at positions start .., into the window pages."""

    def __init__(self, view: torch.Tensor, rows: BlockRows, start: int):
        self.view, self.rows, self.next_position = view, rows, start

    def keys_appended(self, keys: torch.Tensor) -> None:
        self.rows.write(self.view, self.next_position, keys)
        self.next_position += keys.shape[0]


class CompressorPages:
    """CompressorSink: new entries into their rows; of the windows just closed, those that end a
    block leave their first half in that block's overlap fields (in the window pool: `table` is
    the window group's)."""

    def __init__(self, entries: torch.Tensor, rows: BlockRows, overlap: tuple[torch.Tensor, torch.Tensor] | None,
                 table: torch.Tensor):
        self.entries, self.rows, self.overlap, self.table = entries, rows, overlap, table

    def entries_added(self, first_entry: int, entries: torch.Tensor) -> None:
        if entries.shape[0]:
            self.rows.write(self.entries, first_entry, entries)

    def windows_closed(self, first_window: int, overlap_kv: torch.Tensor, overlap_gate: torch.Tensor) -> None:
        """overlap_kv / overlap_gate: (closed, m, dim) of windows first_window ..."""
        per_block = self.rows.rows_per_block  # windows (= entries) per block
        last_windows = range(-(-(first_window + 1) // per_block) * per_block - 1, first_window + overlap_kv.shape[0],
                             per_block)  # windows w with (w + 1) % per_block == 0
        if not last_windows:
            return
        local = torch.tensor([w - first_window for w in last_windows], device=overlap_kv.device)
        blocks = self.table[torch.tensor([(w + 1) // per_block - 1 for w in last_windows], device=self.table.device)]
        kv_view, gate_view = self.overlap
        kv_view[blocks] = overlap_kv[local].to(kv_view.dtype)
        gate_view[blocks] = overlap_gate[local].to(gate_view.dtype)


class PagedKV:
    """Both pools of one rank, and the moves between them and a request's SequenceState."""

    def __init__(self, compressed: PagePool, window: PagePool, block_size: int):
        self.compressed, self.window, self.block_size = compressed, window, block_size

    def load(self, new_state: Callable[[], SequenceState], tables: Sequence[Sequence[int]], start: int,
             slot: SequenceState | None) -> SequenceState:
        """The state after the request's first `start` tokens, with sinks into its pages.
        `tables`: (compressed, window) block tables; `slot`: its state after the previous chunk."""
        inside_block = start % self.block_size != 0
        if inside_block and (slot is None or slot.num_tokens != start):
            raise RuntimeError(f"a chunk starting at token {start}, inside a block, needs the request's open windows")
        state = slot if inside_block else new_state()
        state.num_tokens = start
        compressed_table, window_table = (self._table(t) for t in tables)
        for index, layer in enumerate(state.layers):
            self._load_window(index, layer.window, window_table, start)
            for name, compressor in (("", layer.compressor), ("index_", layer.indexer)):
                if compressor is not None:
                    self._load_compressor(index, name, compressor, (compressed_table, window_table), start,
                                          inside_block)
        return state

    def _table(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.compressed.data.device)

    def _load_window(self, layer: int, window, table: torch.Tensor, start: int) -> None:
        view, rows = self.window.view(layer, "keys"), BlockRows(table, self.block_size)
        window.keys = rows.read(view, max(0, start - window.keep), start)
        window.sink = WindowPages(view, rows, start)

    def _load_compressor(self, layer: int, prefix: str, compressor: CompressorState,
                         tables: tuple[torch.Tensor, torch.Tensor], start: int, inside_block: bool) -> None:
        compressed_table, window_table = tables
        entries = self.compressed.view(layer, "index_keys" if prefix else "entries")
        rows = BlockRows(compressed_table, self.block_size // compressor.rate)
        compressor.entries = rows.read(entries, 0, start // compressor.rate)
        overlap = None
        if (layer, prefix + "overlap_kv") in self.window.layout.fields:  # CSA: overlapping windows
            overlap = (self.window.view(layer, prefix + "overlap_kv"), self.window.view(layer, prefix + "overlap_gate"))
            if not inside_block and start > 0:  # resume from the previous block's last window
                previous = window_table[start // self.block_size - 1]
                compressor.overlap_kv, compressor.overlap_gate = overlap[0][previous], overlap[1][previous]
        compressor.sink = CompressorPages(entries, rows, overlap, window_table)

    @staticmethod
    def slot(state: SequenceState) -> SequenceState:
        """What the request keeps between chunks: its open windows (the growing KV is in pages)."""
        for layer in state.layers:
            layer.window.keys, layer.window.sink = layer.window.keys[:0], None
            for compressor in (layer.compressor, layer.indexer):
                if compressor is not None:
                    compressor.entries, compressor.sink = compressor.entries[:0], None
        return state
