"""The driver's index of host-memory KV blocks: which slot holds which block, and where from.

The host tier is a second BlockPool whose "blocks" are slots of the worker's host buffer, so it
has the device pool's semantics: a referenced slot is in use by a transfer in flight and cannot
be evicted; an unreferenced one holding a block is findable by hash and evicted LRU-first.
Beside the pool it remembers, per slot, the tier its block came from (for per-tier hit counts)
and whether Redis is known to hold it too (then evicting it needs no write-back).

Slot ids start at `first_slot`: a hybrid model's window parts are a second index whose ids
follow the block slots' (protocol/host_slots.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvcache.block_pool import BlockPool, EvictCallback, NoFreeBlocksError

HOST = "host"
REDIS = "redis"


class HostIndex:
    def __init__(self, num_slots: int, write_back: EvictCallback, first_slot: int = 0):
        """`write_back(slot, hash)` runs when a block that Redis does not hold is evicted."""
        self.pool = BlockPool(num_slots, on_evict=self._evicted)
        self.first_slot = first_slot
        self._write_back = write_back
        self._origin = [HOST] * num_slots
        self._in_redis = [False] * num_slots

    @property
    def num_slots(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_cached(self) -> int:
        return self.pool.num_cached_blocks

    def owns(self, slot: int) -> bool:
        return self.first_slot <= slot < self.first_slot + self.num_slots

    def lookup(self, block_hash: bytes) -> int | None:
        local = self.pool.lookup(block_hash)
        return None if local is None else local + self.first_slot

    def leading_run(self, hashes: Sequence[bytes]) -> list[int]:
        """Slots of the longest run of leading hashes held here."""
        return [local + self.first_slot for local in self.pool.lookup_run(hashes)]

    def allocate(self, count: int) -> list[int]:
        """Up to `count` slots (fewer when fewer are free), each referenced once."""
        try:
            local = self.pool.allocate(min(count, self.pool.num_free_blocks))
        except NoFreeBlocksError:  # cannot happen: count is clipped to the free slots
            return []
        return [slot + self.first_slot for slot in local]

    def fill(self, slot: int, block_hash: bytes, origin: str, in_redis: bool) -> bool:
        """Name a referenced slot's block; False if another slot holds it already."""
        local = slot - self.first_slot
        if not self.pool.mark_cached(local, block_hash):
            return False
        self._origin[local], self._in_redis[local] = origin, in_redis
        return True

    def pin(self, slots: Iterable[int]) -> None:
        self.pool.retain(self._local(slots))

    def unpin(self, slots: Iterable[int]) -> None:
        self.pool.release(self._local(slots))

    def touch(self, slot: int) -> None:
        """Mark a slot most recently used (a free one moves to the tail of the LRU queue)."""
        self.pin((slot,))
        self.unpin((slot,))

    def origin(self, slot: int) -> str:
        """The tier the slot's block came from: HOST (spilled here) or REDIS (fetched)."""
        return self._origin[slot - self.first_slot]

    def mark_restored(self, slot: int) -> None:
        """A request used the block: later hits on it are host hits, whatever its origin."""
        self._origin[slot - self.first_slot] = HOST

    def in_redis(self, slot: int) -> bool:
        return self._in_redis[slot - self.first_slot]

    def set_in_redis(self, slot: int) -> None:
        self._in_redis[slot - self.first_slot] = True

    def _local(self, slots: Iterable[int]) -> list[int]:
        return [slot - self.first_slot for slot in slots]

    def _evicted(self, local: int, block_hash: bytes) -> None:
        in_redis = self._in_redis[local]
        self._origin[local], self._in_redis[local] = HOST, False
        if not in_redis:
            self._write_back(local + self.first_slot, block_hash)
