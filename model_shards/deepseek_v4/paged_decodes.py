"""A decode step of N requests on the pages: every per-request part as one op over all N.

A request that decodes (one token, its open windows in its slot: open_windows.py) needs no
SequenceState: its window keys are in the window pages, its entries in the compressed pages and
its open windows in its slot. `DecodeBatch` computes, once per step on the host from host ints
(positions, slots, host block tables) and moved up without a wait, every address the layers need:

    window       new key of request i -> window block table_i[p_i // B], row p_i % B        (N,)
                 its W keys p_i - W + 1 .. p_i, the same way, masked below position 0       (N, W)
    per rate m   open-window row p_i % m in slot s_i                                         (N,)
                 the windows closing (p_i + 1) % m == 0: their slots, entry index e, the
                 compressed page row of e, its RoPE position e * m; of those, the windows
                 ending a block, whose overlap halves go to their window block              (C,), (D,)
    entries      the step's compressed block tables side by side (one device cat), so entry e
                 of request i is row e % (B / m) of block table[offset_i + e // (B / m)]

so a layer's decodes run a fixed number of ops whatever N (`LayerDecodes`, `DecodeWindows`):
one index_put of the N keys, one gather of the (N, W) window, per compressor one index_put of the
N open-window rows, one gather of the C closing windows, their pooling (Compressor.append_decodes),
one index_put of the C entries; then HCA one (N, E_max) gather of the entries, CSA the indexer's
(N, E_max) scores (one kernel on a GPU, a gather on a CPU) and one (N, k) gather of the chosen
entries. No op reads a device value on the host, and no host tensor is made inside the layers
(on a GPU each would be a copy in the middle of the step). Variable per step: N, C, D, E_max, k
(static_decodes.StaticDecodeBatch fixes them per key, for CUDA graphs: decode_graphs.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from model_shards.deepseek_v4.index_scores import decode_index_scores_on_rows, gathered_index_scores, \
    fused_kernel_runs
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.device import host_to_device


@dataclass(frozen=True)
class PagedDecode:
    """One request's token in a decode step and where its state lies."""

    position: int  # of the token: the request holds tokens 0 .. position - 1
    slot: int  # its open windows (open_windows.py)
    tables: tuple[Sequence[int], Sequence[int]]  # (compressed, window) block ids on the host
    compressed_table: torch.Tensor | None  # the compressed block ids on the pools' device (None: static steps)


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, without dispatching an op when it already is (the usual case here)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _long(values: list[int] | list[list[int]], device: torch.device) -> torch.Tensor:
    return host_to_device(torch.tensor(values, dtype=torch.long), device)


class RateAddresses:
    """The step's addresses for the compressors of one rate m (host-built, then on the device)."""

    def __init__(self, decodes: list[PagedDecode], rate: int, block_size: int, device: torch.device):
        per_block = block_size // rate
        positions = [decode.position for decode in decodes]
        closing = [i for i, position in enumerate(positions) if (position + 1) % rate == 0]
        entries = [(positions[i] + 1) // rate - 1 for i in closing]  # the entry each closing window becomes
        block_ends = [j for j, entry in enumerate(entries) if (entry + 1) % per_block == 0]
        self.rate, self.per_block = rate, per_block
        self.counts = [(position + 1) // rate for position in positions]  # entries after this step
        self.widest = max(self.counts)  # E_max: the width of the step's entry reads
        self.counts_on_device = _long(self.counts, device)  # (N,)
        self.pending_rows = _long([position % rate for position in positions], device)  # (N,)
        self.closing_slots = _long([decodes[i].slot for i in closing], device)  # (C,)
        self.entry_positions = _long([entry * rate for entry in entries], device)  # (C,)
        self.entry_blocks = _long([decodes[i].tables[0][entry // per_block] for i, entry in zip(closing, entries)],
                                  device)  # (C,)
        self.entry_rows = _long([entry % per_block for entry in entries], device)  # (C,)
        self.block_ends = _long(block_ends, device)  # (D,) of the C closing windows
        self.block_end_windows = _long([decodes[closing[j]].tables[1][entries[j] // per_block] for j in block_ends],
                                       device)  # (D,) the window block each ends


class DecodeBatch:
    """Everything a step's N paged decodes need, built once before the layers."""

    def __init__(self, pages: PagedKV, sliding_window: int, decodes: list[PagedDecode],
                 rows: list[int] | None, tokens: int):
        """`rows`: each decode's row among the step's `tokens` tokens (None: they are all of them, in order)."""
        device, block = pages.compressed.device, pages.block_size
        self.pages, self.decodes = pages, decodes
        self.positions = [decode.position for decode in decodes]
        self.rows = None if rows is None else _long(rows, device)  # (N,)
        others = [] if rows is None else sorted(set(range(tokens)) - set(rows))
        self.other_rows = _long(others, device)  # the other segments' rows, in order
        self.slots = _long([decode.slot for decode in decodes], device)  # (N,)
        new_keys = [(decode.tables[1][p // block], p % block) for decode, p in zip(decodes, self.positions)]
        self.new_key_blocks, self.new_key_rows = (_long(list(column), device) for column in zip(*new_keys))
        self.window_blocks, self.window_rows, self.window_allowed = self._window(sliding_window, device)
        self.compressed_table = torch.cat([decode.compressed_table for decode in decodes])  # one row space
        offsets = [0]
        for decode in decodes[:-1]:
            offsets.append(offsets[-1] + len(decode.tables[0]))
        self.table_offsets = _long(offsets, device)  # (N,) each request's first block in compressed_table
        rates = {field.rows for (_, name), field in pages.open_windows.fields().items() if name.endswith("pending_kv")}
        self.rates = {rate: RateAddresses(decodes, rate, block, device) for rate in sorted(rates)}
        self._entry_grids: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _window(self, sliding_window: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(N, W) block ids and rows of each decode's window keys, oldest first, and which exist:
        host tensors from the few blocks a window touches (not a Python loop over N x W keys)."""
        block = self.pages.block_size
        keys = torch.tensor(self.positions)[:, None] - sliding_window + 1 + torch.arange(sliding_window)  # (N, W)
        allowed, keys = keys >= 0, keys.clamp(min=0)
        first = [max(0, position - sliding_window + 1) // block for position in self.positions]
        span = -(-sliding_window // block) + 1  # blocks one window can touch
        touched = [decode.tables[1][start:position // block + 1]
                   for decode, start, position in zip(self.decodes, first, self.positions)]
        if any(min(blocks) < 0 for blocks in touched):
            raise RuntimeError("a decode's window reaches a freed window block")
        tables = torch.tensor([blocks + blocks[-1:] * (span - len(blocks)) for blocks in touched])  # (N, span)
        blocks = tables.gather(1, keys // block - torch.tensor(first)[:, None])
        return host_to_device(blocks, device), host_to_device(keys % block, device), host_to_device(allowed, device)

    def entry_grid(self, rate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every entry of every decode at this rate: (N, E_max) block ids, rows, and which exist."""
        if rate not in self._entry_grids:
            addresses = self.rates[rate]
            device = self.compressed_table.device
            entry = torch.arange(addresses.widest, device=device)  # (E_max,)
            allowed = entry < addresses.counts_on_device[:, None]  # (N, E_max)
            self._entry_grids[rate] = (*self.locate(torch.where(allowed, entry, 0), rate), allowed)
        return self._entry_grids[rate]

    def locate(self, entries: torch.Tensor, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, k) entry indices of each decode (all < its count, or 0) -> their block ids and rows."""
        per_block = self.pages.block_size // rate
        return self.compressed_table[self.table_offsets[:, None] + entries // per_block], entries % per_block

    def pick(self, tensor: torch.Tensor) -> torch.Tensor:
        """The decodes' rows of a (tokens, ...) tensor."""
        return tensor if self.rows is None else tensor.index_select(0, self.rows)

    def layer(self, index: int) -> LayerDecodes:
        return LayerDecodes(self, index)

    def finish(self) -> None:
        """After the forward: each slot now holds its windows after the decoded token."""
        for decode in self.decodes:
            self.pages.open_windows.tokens[decode.slot] = decode.position + 1


class LayerDecodes:
    """One layer's view of the step's decodes."""

    def __init__(self, batch: DecodeBatch, layer: int):
        self.batch, self.layer = batch, layer

    def append_window(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the N new keys (N, D) into the window pages; return each decode's W window keys
        (N, W, D), its own last, and which of them exist (N, W)."""
        batch, view = self.batch, self.batch.pages.window.view(self.layer, "keys")
        # index_put_, not `view[...] = `: setitem adds a view when a leading size is 1 (N-dependent ops)
        view.index_put_((batch.new_key_blocks, batch.new_key_rows), as_dtype(keys, view.dtype))
        return view[batch.window_blocks, batch.window_rows], batch.window_allowed

    @cached_property
    def compressor(self) -> DecodeWindows:
        return DecodeWindows(self.batch, self.layer, "")

    @cached_property
    def indexer(self) -> DecodeWindows:
        return DecodeWindows(self.batch, self.layer, "index_")


class DecodeWindows:
    """One compressor's open windows and entries for the step's decodes."""

    def __init__(self, batch: DecodeBatch, layer: int, prefix: str):
        self.batch, self.layer, self.prefix = batch, layer, prefix
        self.windows = batch.pages.open_windows
        self.addresses = batch.rates[self.windows.view(layer, prefix + "pending_kv").shape[1]]
        self.entries = batch.pages.compressed.view(layer, "index_keys" if prefix else "entries")

    def _field(self, name: str) -> torch.Tensor:
        return self.windows.view(self.layer, self.prefix + name)  # (slots, m, width)

    def append(self, kv: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each decode's projections (N, width) into its open window; return the windows
        that close, (C, m, width) each: kv and gate logits."""
        slots, rows, closing = self.batch.slots, self.addresses.pending_rows, self.addresses.closing_slots
        pending_kv, pending_gate = self._field("pending_kv"), self._field("pending_gate")
        pending_kv.index_put_((slots, rows), as_dtype(kv, pending_kv.dtype))
        pending_gate.index_put_((slots, rows), as_dtype(gate, pending_gate.dtype))
        return pending_kv[closing], pending_gate[closing]

    def swap_overlap(self, kv: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The closing windows' first halves (C, m, dim), gate with its position bias: keep them as
        their requests' overlaps (and in the window pages where a window ends a block); return the
        overlaps they replace, which their entries pool."""
        closing, addresses = self.addresses.closing_slots, self.addresses
        overlap_kv, overlap_gate = self._field("overlap_kv"), self._field("overlap_gate")
        previous = overlap_kv[closing], overlap_gate[closing]
        overlap_kv.index_put_((closing,), as_dtype(kv, overlap_kv.dtype))
        overlap_gate.index_put_((closing,), as_dtype(gate, overlap_gate.dtype))
        window = self.batch.pages.window
        page_kv = window.view(self.layer, self.prefix + "overlap_kv")
        page_gate = window.view(self.layer, self.prefix + "overlap_gate")
        page_kv.index_put_((addresses.block_end_windows,),
                           as_dtype(kv.index_select(0, addresses.block_ends), page_kv.dtype))
        page_gate.index_put_((addresses.block_end_windows,),
                             as_dtype(gate.index_select(0, addresses.block_ends), page_gate.dtype))
        return previous

    @property
    def entry_positions(self) -> torch.Tensor:
        return self.addresses.entry_positions  # (C,)

    def write_entries(self, entries: torch.Tensor) -> None:
        """The closing windows' pooled entries (C, dim) into their compressed page rows."""
        self.entries.index_put_((self.addresses.entry_blocks, self.addresses.entry_rows),
                                as_dtype(entries, self.entries.dtype))

    def read_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every entry of every decode (N, E_max, dim), and which exist (N, E_max)."""
        blocks, rows, allowed = self.batch.entry_grid(self.addresses.rate)
        return self.entries[blocks, rows], allowed

    def gather(self, selected: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each decode's chosen entries (N, k) ascending, the first min(topk, E_i) its own ->
        (N, k, dim) and which are its own (N, k)."""
        widths = self.addresses.counts_on_device.clamp(max=topk)  # (N,) each decode's own choices
        allowed = torch.arange(selected.shape[1], device=selected.device) < widths[:, None]
        blocks, rows = self.batch.locate(torch.where(allowed, selected, 0), self.addresses.rate)
        return self.entries[blocks, rows], allowed

    def index_scores(self, q: torch.Tensor, head_weights: torch.Tensor, ranked: bool) -> torch.Tensor:
        """The indexer's scores (N, E_max) of each decode's query against its keys, -inf past E_i
        (index_scores.decode_index_scores): one kernel over the row space on a GPU."""
        batch = self.batch
        if fused_kernel_runs(q, self.entries.dtype):
            row_space = (self.entries, batch.compressed_table, self.addresses.per_block)
            first_rows = batch.table_offsets * self.addresses.per_block  # (N,) each decode's first row
            return decode_index_scores_on_rows(q, head_weights, row_space, first_rows,
                                               self.addresses.counts_on_device, self.addresses.widest, ranked)
        return gathered_index_scores(q, head_weights, *self.read_entries(), ranked)
