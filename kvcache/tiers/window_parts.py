"""A hybrid model's window parts in the host and Redis tiers: which blocks keep one, and where.

DeepSeek-V4 stores block i as two parts (model_shards/deepseek_v4/kv_tiers.py): the compressed
part, which every restore of a prefix through block i reads, and the window part (the sliding
window's raw keys and the CSA overlap halves at the block's end), which only a restore ENDING at
block i reads (plus the `window_blocks` - 1 before it when the window spans several blocks). So:

- a window part is kept only for blocks where a restore is likely to end: every
  `interval_blocks`-th block (a checkpoint) and the last two full blocks of a sequence as it is
  computed (a later request that extends it hits there; while decoding, every newly full block
  is the last one). A window block is freed as the window moves on, so this is decided when the
  block is computed;
- window parts live in their own host pool (slot ids after the block slots: protocol/host_slots.py)
  and in Redis under a key derived from the block's hash, sealed like any block;
- a restore ends at the last block of its run whose window part is at hand: a missing, evicted or
  corrupt one restores fewer blocks, and the rest is recomputed.

Plain Python, no torch, no I/O: the driver's bookkeeping only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from kvcache.tiers.host_index import REDIS, HostIndex
from protocol.kv_transfer_ops import HIT

_KEY_DOMAIN = b"longctx/window-part/v1"


def window_part_key(block_hash: bytes) -> bytes:
    """The 32-byte name of a block's window part: never equal to any block's chained hash."""
    return hashlib.sha256(_KEY_DOMAIN + block_hash).digest()


class WindowParts:
    def __init__(self, index: HostIndex, window_blocks: int, interval_blocks: int, block_size: int):
        """`index`: the host pool of window parts, named by window_part_key; `window_blocks`: the
        window blocks a restore reads up to its end."""
        self.index = index
        self.window_blocks = window_blocks
        self.interval_blocks = interval_blocks
        self.block_size = block_size
        self._fetching: dict[int, bytes] = {}  # slot -> key

    def wanted(self, block_index: int, num_tokens: int) -> bool:
        """Whether block `block_index` of a sequence of `num_tokens` tokens keeps its window part."""
        last_full = num_tokens // self.block_size - 1  # a longer request's hit ends here
        last_restorable = (num_tokens - 1) // self.block_size - 1  # this sequence's own hit ends here
        return (block_index + 1) % self.interval_blocks == 0 or block_index in (last_full, last_restorable)

    def lookup(self, block_hash: bytes) -> int | None:
        return self.index.lookup(window_part_key(block_hash))

    def needed(self, first_block: int, end_block: int) -> range:
        """Block indices whose window parts a restore of blocks first_block .. end_block - 1 reads
        (the device holds those of blocks before first_block, as it holds their window)."""
        return range(max(first_block, end_block - self.window_blocks), end_block)

    def restorable_blocks(self, hashes: Sequence[bytes], first_block: int, num_blocks: int) -> int:
        """The longest leading part of a run of blocks (`hashes` indexed by block) that ends where
        every window part it reads is in host memory."""
        for count in range(num_blocks, 0, -1):
            if all(self.lookup(hashes[index]) is not None for index in self.needed(first_block, first_block + count)):
                return count
        return 0

    def slots(self, hashes: Sequence[bytes], first_block: int, end_block: int) -> list[int]:
        """The window-part slots a restore of blocks first_block .. end_block - 1 loads, in the
        order of `needed`, pinned (every one is in host memory: restorable_blocks said so)."""
        slots = [self.lookup(hashes[index]) for index in self.needed(first_block, end_block)]
        self.index.pin(slots)
        return slots

    def fetch(self, hashes: Sequence[bytes], fetches: list[tuple[bytes, int]]) -> set[int]:
        """Queue Redis -> host fetches of these blocks' window parts (those not in host memory
        or on their way already); the slots a request must wait for."""
        waiting = set()
        for block_hash in hashes:
            key = window_part_key(block_hash)
            slot = next((slot for slot, fetching in self._fetching.items() if fetching == key), None)
            if slot is None and self.index.lookup(key) is None:
                slot = next(iter(self.index.allocate(1)), None)
                if slot is None:  # every slot is in use: the restore ends earlier
                    continue
                self._fetching[slot] = key
                fetches.append((key, slot))
            if slot is not None:
                waiting.add(slot)
        return waiting

    def fetch_done(self, slot: int, outcome: str) -> None:
        """A fetch came back: a verified part is findable; anything else leaves the slot empty."""
        key = self._fetching.pop(slot)
        if outcome == HIT:
            self.index.fill(slot, key, REDIS, in_redis=True)
        self.index.unpin((slot,))

    @property
    def num_fetching(self) -> int:
        return len(self._fetching)
