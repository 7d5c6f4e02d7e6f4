"""DeepSeek-V4 blocks in the host and Redis tiers: a block's two parts in two host pools.

    block slot i       (uint8):  | compressed block (CSA entries, indexer keys, HCA entries) |
    window-part slot j (uint8):  | window block (every layer's raw keys, CSA overlap halves)   |

A restored prefix of k blocks needs compressed blocks 0 .. k-1 but only the window blocks of its
last window, so the window part (~80% of a block's bytes at the flash shape) has its own smaller
pool and its own Redis key, and the driver keeps it only for some blocks (kvcache/tiers/
window_parts.py). Slot ids are one space (protocol/host_slots.py): window-part slots follow the
block slots, so `window_saves` / `window_loads` and the Redis ops name them like any slot. Redis
I/O, checksums and MACs are the dense path's (RemoteBlockIO), one instance per part: a value is
one part of one block, its header naming that part's size, so a part never passes for the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cluster.config import LongctxConfig
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.kv_io.codec import BlockFormat
from model_shards.kv_io.kv_transfer import KVTransfer, copy_runs, remote_factory_for
from model_shards.kv_io.remote_block_io import Completed, RemoteBlockIO
from protocol.host_slots import HostSlots, split_host_bytes


class HybridKVTransfer(KVTransfer):
    def __init__(self, pages: PagedKV, slots: HostSlots,
                 remote_factory: Callable[[BlockFormat, np.ndarray], RemoteBlockIO] | None = None):
        # Not KVTransfer.__init__: its host layout mirrors one dense cache tensor.
        self.pages, self.kv = pages, pages.compressed  # kv: what calibrate and _synchronize read
        self.window_base = slots.num_blocks  # the first window-part slot id
        self.host = self._host_pool(slots.num_blocks, pages.compressed.bytes_per_block)
        self.window_host = self._host_pool(slots.num_window_parts, pages.window.bytes_per_block)
        self.format = _part_format(pages.compressed.bytes_per_block)
        self.window_format = _part_format(pages.window.bytes_per_block)
        self._staged = False
        self.remote = None
        if remote_factory is not None:
            self.remote = SplitRemote(remote_factory(self.format, self.host.numpy()),
                                      remote_factory(self.window_format, self.window_host.numpy()), self.window_base)

    def _host_pool(self, num_slots: int, slot_bytes: int) -> torch.Tensor:
        pinned = self.pages.compressed.device.type == "cuda"
        return torch.zeros((num_slots, slot_bytes), dtype=torch.uint8, pin_memory=pinned)

    @classmethod
    def create_for(cls, config: LongctxConfig, pages: PagedKV, model_fingerprint: str) -> HybridKVTransfer | None:
        """The worker's transfer engine, or None when the config has no host tier."""
        tiers = config.kv_tiers
        slots = split_host_bytes(tiers.host_bytes, pages.compressed.bytes_per_block, pages.window.bytes_per_block,
                                 tiers.window_part_interval_blocks)
        if not config.cache.enable_prefix_caching or slots.num_blocks == 0:
            return None
        return cls(pages, slots, remote_factory_for(config, model_fingerprint))

    def save(self, pairs: Sequence[tuple[int, int]], window_pairs: Sequence[tuple[int, int]] = ()) -> int:
        """(compressed block, slot) and (window block, window-part slot) pairs: device -> host."""
        copy_runs(self.pages.compressed.data, self.host, pairs)
        copy_runs(self.pages.window.data, self.window_host, [(block, slot - self.window_base)
                                                             for block, slot in window_pairs])
        self._synchronize()
        return len(pairs) * self.format.nbytes + len(window_pairs) * self.window_format.nbytes

    def load(self, pairs: Sequence[tuple[int, int]], window_pairs: Sequence[tuple[int, int]] = ()) -> int:
        """(slot, compressed block) and (window-part slot, window block) pairs: host -> device."""
        copy_runs(self.host, self.pages.compressed.data, pairs)
        copy_runs(self.window_host, self.pages.window.data, [(slot - self.window_base, block)
                                                             for slot, block in window_pairs])
        self._synchronize()
        return len(pairs) * self.format.nbytes + len(window_pairs) * self.window_format.nbytes


def _part_format(nbytes: int) -> BlockFormat:
    return BlockFormat("uint8", (nbytes,), nbytes)


class SplitRemote:
    """Two RemoteBlockIOs behind RemoteBlockIO's face: slots below `window_base` hold blocks'
    compressed parts, the others window parts (each under the key the driver names)."""

    def __init__(self, blocks: RemoteBlockIO, windows: RemoteBlockIO, window_base: int):
        self.blocks, self.windows, self.window_base = blocks, windows, window_base

    @property
    def store(self):
        return self.blocks.store

    def write_back(self, items: Sequence[tuple[int, bytes]]) -> None:
        blocks, windows = self._split(items, slot_at=0)
        self.blocks.write_back(blocks)
        self.windows.write_back(windows)

    def write_through(self, items: Sequence[tuple[int, bytes]]) -> None:
        blocks, windows = self._split(items, slot_at=0)
        self.blocks.write_through(blocks)
        self.windows.write_through(windows)

    def fetch(self, items: Sequence[tuple[bytes, int]]) -> None:
        blocks, windows = self._split(items, slot_at=1)
        self.blocks.fetch(blocks)
        self.windows.fetch(windows)

    def probe(self, items) -> None:
        self.blocks.probe(items)

    def calibrate(self, slots: Sequence[int]):
        return self.blocks.calibrate(slots)

    def drain(self, timeout_s: float = 0.0) -> Completed:
        done = self.blocks.drain(timeout_s)
        more = self.windows.drain(0.0 if done.fetched or done.probed or done.written else timeout_s)
        done.fetched += [(slot + self.window_base, outcome) for slot, outcome in more.fetched]
        done.written += [(slot + self.window_base, stored) for slot, stored in more.written]
        done.transfers += more.transfers
        done.stored, done.dropped = done.stored + more.stored, done.dropped + more.dropped
        return done

    def new_errors(self) -> int:
        return self.blocks.new_errors() + self.windows.new_errors()

    def close(self) -> None:
        self.blocks.close()
        self.windows.close()

    def _split(self, items: Sequence[tuple], slot_at: int) -> tuple[list, list]:
        """Items naming block slots, and those naming window-part slots (renumbered from 0)."""
        blocks, windows = [], []
        for item in items:
            if item[slot_at] < self.window_base:
                blocks.append(item)
            else:
                local = list(item)
                local[slot_at] -= self.window_base
                windows.append(tuple(local))
        return blocks, windows
