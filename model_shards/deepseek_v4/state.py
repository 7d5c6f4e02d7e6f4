"""A request's DeepSeek-V4 attention state: plain tensors, one small dataclass per kind.

V4's cache is hybrid. Per layer, after a request's first n tokens it holds:

    every layer   SlidingWindowState  K(=V) of the last min(n, W - 1) tokens (W = sliding_window):
                                      all a later query needs of the raw keys
    CSA, HCA      CompressorState     n // m compressed entries (m = the layer's compress rate),
                                      the n % m projected tokens of the open window, and (CSA
                                      only) the first half of the last closed window's
                                      projections, which the next entry overlaps
    CSA           CompressorState     the same for the Lightning Indexer's own keys

Appending a chunk is the one way the state changes (`SlidingWindowState.append`,
`CompressorState.close_windows` + `add_entries`, called by the attention layer in that order), and
it depends only on the chunk's tokens: any split of a sequence into chunks yields the same state.
Tensors are replaced, never written in place, so a snapshot (`SequenceState.snapshot`) shares
them safely, which is what a cached prefix needs. Only `entries` grow with the context; everything
else is bounded by W and m, so a paged cache keeps `entries` in blocks per layer type and the rest
in one small fixed slot per request and layer.

The paged cache (paged_state.py) points each compressor's `entries` at its pages (entries.py:
new entries are written there, old ones read where they lie, never copied out whole), fills the
window keys from pages before each chunk and attaches sinks (`WindowSink`, `CompressorSink`):
every appended key and the overlap half of every closed window reach them as the model runs, so
the pages stay the store of record.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import torch

from model_shards.deepseek_v4.entries import ContiguousEntries, Entries


class WindowSink(Protocol):
    """Receives every key a window appends, before the window drops old ones (a paged cache's
    store of record: model_shards/deepseek_v4/paged_state.py)."""

    def keys_appended(self, keys: torch.Tensor) -> None: ...


class CompressorSink(Protocol):
    """Receives, for an overlapping (CSA) compressor, the first halves of the windows it just
    closed: what a resume at a block boundary needs. (New entries need no sink: paged entries
    write themselves into their pages, entries.py.)"""

    def windows_closed(self, first_window: int, overlap_kv: torch.Tensor, overlap_gate: torch.Tensor) -> None: ...


@dataclass
class SlidingWindowState:
    keep: int  # W - 1: rows a query at the next position can still reach
    keys: torch.Tensor  # (min(n, keep), head_dim) after kv_norm and RoPE, oldest first
    sink: WindowSink | None = None  # paged: where every appended key is written

    def append(self, new_keys: torch.Tensor) -> torch.Tensor:
        """Add the chunk's keys (T, head_dim); return the keys its queries may reach (w + T, head_dim),
        w = rows held before, the first at position n - w."""
        if self.sink is not None:
            self.sink.keys_appended(new_keys)
        reachable = torch.cat((self.keys, new_keys))  # (w + T, head_dim)
        dropped = max(0, reachable.shape[0] - self.keep)
        # a view pins the rows it drops: cloned, unless that is a decode's one row (a copy saved a token)
        self.keys = reachable[dropped:] if dropped <= 1 else reachable[dropped:].clone()
        return reachable


@dataclass
class CompressorState:
    rate: int  # m: source tokens per entry
    entries: Entries  # n // m rows (dim), after kv_norm and RoPE at position (entry index) * m
    pending_kv: torch.Tensor  # (n % m, width) projections of the open window's tokens
    pending_gate: torch.Tensor  # (n % m, width) gate logits, position bias not yet added
    overlap_kv: torch.Tensor | None = None  # (m, dim) CSA: first half of the last closed window
    overlap_gate: torch.Tensor | None = None  # (m, dim) its gate logits, position bias added
    sink: CompressorSink | None = None  # paged: where closed windows' halves go

    @classmethod
    def empty(cls, rate: int, dim: int, width: int, dtype: torch.dtype, device: torch.device) -> CompressorState:
        return cls(rate, ContiguousEntries(torch.empty(0, dim, dtype=dtype, device=device)),
                   torch.empty(0, width, dtype=dtype, device=device), torch.empty(0, width, dtype=dtype, device=device))

    @property
    def num_entries(self) -> int:
        return self.entries.count

    def close_windows(self, kv: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append the chunk's projections (T, width) to the open window; return the windows that are
        now complete, (closed, m, width) each, and the entry index the first of them becomes. The
        remainder (< m tokens) stays pending."""
        kv, gate = torch.cat((self.pending_kv, kv)), torch.cat((self.pending_gate, gate))  # (p + T, width)
        closed = kv.shape[0] // self.rate
        usable = closed * self.rate
        if kv.shape[0] <= self.rate:  # a decode's few rows: views pin nothing more (a copy saved a token)
            self.pending_kv, self.pending_gate = kv[usable:], gate[usable:]
        else:  # a view would pin the chunk
            self.pending_kv, self.pending_gate = kv[usable:].clone(), gate[usable:].clone()
        width = kv.shape[-1]
        return kv[:usable].view(closed, self.rate, width), gate[:usable].view(closed, self.rate, width), \
            self.num_entries

    def add_entries(self, entries: torch.Tensor) -> Entries:
        """Append folded entries (closed, dim); return all entries so far."""
        self.entries = self.entries.append(entries)
        return self.entries


@dataclass
class LayerState:
    layer_type: str
    window: SlidingWindowState
    compressor: CompressorState | None = None  # CSA and HCA layers
    indexer: CompressorState | None = None  # CSA layers: the Lightning Indexer's keys


@dataclass
class SequenceState:
    """All layers' state of one request after its first `num_tokens` tokens."""

    num_tokens: int
    layers: list[LayerState]

    def snapshot(self) -> SequenceState:
        """An independent copy that shares the (never mutated) tensors."""
        layers = [dataclasses.replace(layer, window=dataclasses.replace(layer.window),
                                      compressor=layer.compressor and dataclasses.replace(layer.compressor),
                                      indexer=layer.indexer and dataclasses.replace(layer.indexer))
                  for layer in self.layers]
        return SequenceState(self.num_tokens, layers)

    def nbytes(self) -> Counter[str]:
        """Bytes held, keyed "<layer type>/entries" (grows with the context: compressed entries and
        indexer keys) and "<layer type>/fixed" (sliding window, open windows, overlaps)."""
        totals: Counter[str] = Counter()
        for layer in self.layers:
            totals[f"{layer.layer_type}/fixed"] += _bytes(layer.window.keys)
            for compressor in (layer.compressor, layer.indexer):
                if compressor is not None:
                    totals[f"{layer.layer_type}/entries"] += compressor.entries.nbytes
                    totals[f"{layer.layer_type}/fixed"] += sum(
                        _bytes(t) for t in (compressor.pending_kv, compressor.pending_gate, compressor.overlap_kv,
                                            compressor.overlap_gate))
        return totals


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
