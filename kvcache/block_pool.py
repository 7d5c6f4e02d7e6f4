"""The pool of KV blocks on one device: reference counts, the LRU free queue, the prefix cache.

Blocks are the ints 0..num_blocks-1; the pool moves ids and metadata only, never tensors.

Every block is in exactly one of two states:
  * referenced (ref count > 0): in some request's block table;
  * free (ref count 0): in the free queue, least recently freed at the head.

A free block may still be *cached*: it keeps the hash of the full block it holds and stays
findable by `lookup` until `allocate` pops it from the head and reuses it (eviction). So the free
queue doubles as the prefix cache's eviction order, and "free" counts evictable cached blocks too.

Why LRU by free time: a block freed long ago is the least likely to be asked for again, and
callers release a sequence's blocks tail first (see `release`), so a shared prefix outlives the
private suffixes built on it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

EvictCallback = Callable[[int, bytes], None]


class NoFreeBlocksError(RuntimeError):
    """`allocate` asked for more blocks than are free."""


class BlockPool:
    """Block ids, their ref counts and the prefix cache of one device's KV memory.

    `on_evict(block_id, block_hash)` runs when `allocate` reuses a cached block. The block's KV
    is still intact then (its new owner has not written it yet), so a slower memory tier can
    copy it out; the callback should not raise.
    """

    def __init__(self, num_blocks: int, on_evict: EvictCallback | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> the one block holding it
        # An OrderedDict used as a set: O(1) pop from the head, append at the tail, and removal
        # from the middle on a prefix-cache hit.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Blocks never allocated are ids >= this: they were queued in id order and only ever leave
        # from the head (nothing finds an empty block to retain), so they are the free queue's head.
        self._first_unused_id = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out now, evictable cached blocks included."""
        return len(self._free)

    @property
    def num_unused_blocks(self) -> int:
        """Blocks never allocated: the free queue's first ones, holding nothing to evict."""
        return self.num_blocks - self._first_unused_id

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, referenced or not."""
        return len(self._cached)

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks from the head of the free queue, each with ref count 1.

        A taken block that was cached is evicted first. Raises NoFreeBlocksError, changing
        nothing, when fewer than `count` blocks are free.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count > len(self._free):
            raise NoFreeBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        block_ids = [self._free.popitem(last=False)[0] for _ in range(count)]
        evicted = []
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
            self._first_unused_id = max(self._first_unused_id, block_id + 1)
            if self._block_hashes[block_id] is not None:
                evicted.append((block_id, self._uncache(block_id)))
        # Notify only once the pool is consistent again, so a failing callback corrupts nothing.
        if self._on_evict is not None:
            for block_id, block_hash in evicted:
                self._on_evict(block_id, block_hash)
        return block_ids

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this content, whether referenced or free; None if not cached."""
        return self._cached.get(block_hash)

    def lookup_run(self, block_hashes: Iterable[bytes]) -> list[int]:
        """The blocks holding the leading run of these hashes, up to the first not cached: a
        prompt's prefix hit in one pass (516 lookups for a 33K-token prompt on every admission)."""
        cached, found = self._cached, []
        for block_hash in block_hashes:
            block_id = cached.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_free_among(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks are free (a hit on one takes it out of the free queue)."""
        ref_counts = self._ref_counts
        return sum(1 for block_id in block_ids if ref_counts[block_id] == 0)

    def all_cached(self, block_ids: Iterable[int]) -> bool:
        """Whether every one of these blocks still holds a findable block (none was evicted)."""
        block_hashes = self._block_hashes
        return all(block_hashes[block_id] is not None for block_id in block_ids)

    def retain(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block; a free one leaves the free queue (a prefix-cache hit).
        An id out of range raises IndexError before any block is retained. One pass with local
        names: a 33K-token prompt's hit retains 516 blocks at every admission."""
        block_ids = self._checked_ids(block_ids)
        ref_counts, free, first_unused = self._ref_counts, self._free, self._first_unused_id
        for block_id in block_ids:
            if ref_counts[block_id] == 0:
                del free[block_id]
                # (an unused block taken from the middle: count the ones before it as used too, so
                # that the unused ones left are still the queue's head)
                if block_id >= first_unused:
                    first_unused = block_id + 1
            ref_counts[block_id] += 1
        self._first_unused_id = first_unused

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop a reference from each block; one that reaches 0 joins the free queue's tail.

        Pass blocks in the order they should be evicted: a sequence's blocks in reverse, so its
        private tail goes before its (possibly shared) prefix. Releasing an unreferenced block is
        a caller bug and raises ValueError; blocks before it in `block_ids` stay released.
        """
        ref_counts, free = self._ref_counts, self._free
        for block_id in self._checked_ids(block_ids):
            count = ref_counts[block_id]
            if count == 0:
                raise ValueError(f"block {block_id} released with ref count 0")
            ref_counts[block_id] = count - 1
            if count == 1:
                free[block_id] = None

    def mark_cached(self, block_id: int, block_hash: bytes) -> bool:
        """Record that a referenced block now holds the full block named `block_hash`.

        Returns whether the block is now findable by that hash. If another block already holds
        the hash, the first one wins and this block stays uncached: one name, one block.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"block {block_id} is free; only a referenced block can be cached")
        current = self._block_hashes[block_id]
        if current is not None:
            if current != block_hash:
                raise ValueError(f"block {block_id} is already cached under another hash")
            return True
        if block_hash in self._cached:
            return False
        self._block_hashes[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        """The hash the block is cached under, or None."""
        self._check_id(block_id)
        return self._block_hashes[block_id]

    def next_to_evict(self, count: int) -> Iterator[tuple[int, bytes | None]]:
        """The first `count` free blocks in eviction order, each with the hash it is cached
        under (None: it holds nothing anyone can find); lazily, and valid only until the pool
        changes."""
        return ((block_id, self._block_hashes[block_id]) for block_id in itertools.islice(self._free, count))

    def free_queue(self) -> list[int]:
        """Free blocks in eviction order, next to be evicted first (O(n): for tests and debugging)."""
        return list(self._free)

    def _uncache(self, block_id: int) -> bytes:
        block_hash = self._block_hashes[block_id]
        assert block_hash is not None
        self._block_hashes[block_id] = None
        del self._cached[block_hash]
        return block_hash

    def _checked_ids(self, block_ids: Iterable[int]) -> list[int] | tuple[int, ...]:
        """The ids as a sequence, each checked in range (at C speed: min and max)."""
        if not isinstance(block_ids, (list, tuple)):
            block_ids = list(block_ids)
        if block_ids and (min(block_ids) < 0 or max(block_ids) >= self.num_blocks):
            bad = next(block_id for block_id in block_ids if not 0 <= block_id < self.num_blocks)
            raise IndexError(f"block id {bad} out of range [0, {self.num_blocks})")
        return block_ids

    def _check_id(self, block_id: int) -> None:
        # Without this a negative id would silently index from the end of the lists.
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} out of range [0, {self.num_blocks})")
