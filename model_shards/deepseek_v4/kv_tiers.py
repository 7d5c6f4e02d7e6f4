"""DeepSeek-V4 blocks in the host and Redis tiers: a slot holds block i of both page pools.

    host slot (uint8):  | compressed block (entries, indexer keys) | window block (keys, overlap halves) |

A restored prefix of k blocks needs compressed blocks 0 .. k-1 and the window blocks of its last
window (kvcache/tier_manager.py writes every block through when computed, while its window block
still holds it). The driver names the window part's blocks in `window_saves` / `window_loads`
beside the `saves` / `loads` of the same slots. Everything else (Redis I/O, checksums and MACs,
reports) is the dense KVTransfer's, over these byte rows: a Redis value is one slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cluster.config import LongctxConfig
from model_shards.deepseek_v4.paged_state import PagedKV
from model_shards.kv_io.codec import BlockFormat
from model_shards.kv_io.kv_transfer import KVTransfer, copy_runs, remote_factory_for
from model_shards.kv_io.remote_block_io import RemoteBlockIO


class HybridKVTransfer(KVTransfer):
    def __init__(self, pages: PagedKV, num_slots: int,
                 remote_factory: Callable[[BlockFormat, np.ndarray], RemoteBlockIO] | None = None):
        # Not KVTransfer.__init__: its host layout mirrors one dense cache tensor.
        self.pages, self.kv = pages, pages.compressed  # kv: what calibrate and _synchronize read
        self.compressed_bytes = pages.compressed.bytes_per_block
        slot_bytes = self.compressed_bytes + pages.window.bytes_per_block
        self.host = torch.zeros((num_slots, slot_bytes), dtype=torch.uint8, pin_memory=pages.compressed.device.type == "cuda")
        self.format = BlockFormat("uint8", (self.compressed_bytes, pages.window.bytes_per_block), slot_bytes)
        self._staged = False
        self.remote = remote_factory(self.format, self.host.numpy()) if remote_factory else None

    @classmethod
    def create_for(cls, config: LongctxConfig, pages: PagedKV, model_fingerprint: str) -> HybridKVTransfer | None:
        """The worker's transfer engine, or None when the config has no host tier."""
        num_slots = config.kv_tiers.host_bytes // (pages.compressed.bytes_per_block + pages.window.bytes_per_block)
        if not config.cache.enable_prefix_caching or num_slots == 0:
            return None
        return cls(pages, num_slots, remote_factory_for(config, model_fingerprint))

    def save(self, pairs: Sequence[tuple[int, int]], window_pairs: Sequence[tuple[int, int]] = ()) -> int:
        """(compressed block, slot) and (window block, slot) pairs: device -> host."""
        copy_runs(self.pages.compressed.data, self.host[:, :self.compressed_bytes], pairs)
        copy_runs(self.pages.window.data, self.host[:, self.compressed_bytes:], window_pairs)
        self._synchronize()
        return len(pairs) * self.compressed_bytes + len(window_pairs) * self.pages.window.bytes_per_block

    def load(self, pairs: Sequence[tuple[int, int]], window_pairs: Sequence[tuple[int, int]] = ()) -> int:
        """(slot, compressed block) and (slot, window block) pairs: host -> device."""
        copy_runs(self.host[:, :self.compressed_bytes], self.pages.compressed.data, pairs)
        copy_runs(self.host[:, self.compressed_bytes:], self.pages.window.data, window_pairs)
        self._synchronize()
        return len(pairs) * self.compressed_bytes + len(window_pairs) * self.pages.window.bytes_per_block
