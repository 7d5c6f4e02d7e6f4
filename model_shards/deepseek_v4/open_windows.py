"""Every running request's open compression windows on the device, one slot each.

Between chunks a V4 request carries, besides its pages, only its open windows: per CSA / HCA
compressor the projections of the < m tokens of the window being filled and (CSA) the first half
of the last closed window (kv_pages.open_window_layout). They live here, slot s of a pool shaped
(slots, m, width) per field, so that a decode step reaches every request's open window with one
index per field (paged_decodes.py) instead of one small tensor per request and layer; a chunk run
on its own state reads its slot before (`PagedKV.load`) and writes it back after (`PagedKV.save`).

Slots are handed out per request and returned when it ends; the pool doubles when they run out
(only at a request's arrival, never inside a step), or is sized up front (`reserve`) for CUDA
graphs. `tokens[slot]` records after how many of its tokens the slot's windows were written: a
chunk may start from the slot only there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model_shards.deepseek_v4.kv_pages import PagePool, open_window_layout
from model_shards.deepseek_v4.state import SequenceState


class OpenWindows:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.pool: PagePool | None = None  # shaped after the model's state at the first slot
        self.free: list[int] = []
        self.tokens: dict[int, int] = {}  # slot -> tokens its windows hold

    def take(self, new_state: Callable[[], SequenceState]) -> int:
        """A free slot (nothing valid in it yet), the pool grown if all are taken."""
        if not self.free:  # slots 0 .. size - 1 are all taken
            self.reserve(1, new_state)
        return self.free.pop()

    def reserve(self, count: int, new_state: Callable[[], SequenceState]) -> None:
        """At least `count` free slots, the pool grown now (at least doubling) if fewer are: a
        CUDA graph of decode steps (decode_graphs.py) reads the pool where it lies."""
        if self.pool is None:
            self.pool = PagePool(open_window_layout(new_state()), 0, self.device)
        if len(self.free) >= count:
            return
        size = self.pool.num_blocks
        grown = PagePool(self.pool.layout, max(4, 2 * size, size + count - len(self.free)), self.device)
        grown.data[:size] = self.pool.data
        self.pool = grown
        self.free = list(range(grown.num_blocks - 1, size - 1, -1)) + self.free

    def release(self, slot: int) -> None:
        self.tokens.pop(slot, None)
        self.free.append(slot)

    def holds(self, slot: int, tokens: int) -> bool:
        """Whether the slot holds the open windows after exactly `tokens` tokens."""
        return self.tokens.get(slot) == tokens

    def view(self, layer: int, name: str) -> torch.Tensor:
        """(slots, rows, width) view of one field in every slot."""
        return self.pool.view(layer, name)

    def fields(self) -> dict:
        """The slot layout's fields by (layer, name) (none before the first slot)."""
        return {} if self.pool is None else self.pool.layout.fields

    def has(self, layer: int, name: str) -> bool:
        return self.pool is not None and (layer, name) in self.pool.layout.fields
