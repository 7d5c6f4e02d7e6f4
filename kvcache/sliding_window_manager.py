"""Per-request block tables for KV that only a sliding window reads: blocks that leave the window
are freed as it moves, so a 1M-token request holds a handful of blocks, not 1M tokens' worth.

A hybrid model (DeepSeek-V4) keeps raw KV of its last `window_tokens` tokens beside compressed
entries for the whole history; this manager owns the raw part (one block group of the KV-cache
coordinator). Blocks share the block size and the prefix hashes of the other groups. A request's
table, left to right:

  | NULL_BLOCK ... (left the window, freed) | blocks in the window | being computed |
  0                                          first_live             len

The next chunk starting at token s reads positions [s - window_tokens, s): blocks wholly before
that are released (`release_before`). Released blocks that were full stay findable by hash
until reused, so a later request sharing the prefix can resume: a prefix of k blocks is servable
when the blocks covering its last `window_tokens` tokens are all still cached. A prefix hit may
end in blocks restored from a KV tier (`restored_blocks`): those of them in the window get fresh
blocks here, which the tier loads (kvcache/tier_manager.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcache.block_pool import BlockPool, EvictCallback

NULL_BLOCK = -1  # a table entry whose block left the window: nothing to read there


class SlidingWindowManager:
    def __init__(self, num_blocks: int, block_size: int, window_tokens: int,
                 enable_prefix_caching: bool = True, on_evict: EvictCallback | None = None):
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
        self.block_size = block_size
        self.window_tokens = window_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, on_evict)
        self._block_tables: dict[str, list[int]] = {}
        self._num_marked: dict[str, int] = {}  # leading blocks already named by hash (or null)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def blocks_in_window(self) -> int:
        """Blocks covering the `window_tokens` tokens before a block boundary."""
        return -(-self.window_tokens // self.block_size)

    # --- prefix hits ---------------------------------------------------------------------------
    def servable_prefix(self, block_hashes: Sequence[bytes], max_blocks: int) -> int:
        """The longest prefix of at most `max_blocks` blocks whose window blocks are all cached."""
        if not self.enable_prefix_caching:
            return 0
        for num_blocks in range(max_blocks, 0, -1):
            if self._window_hits(block_hashes, num_blocks) is not None:
                return num_blocks
        return 0

    def _window_hits(self, block_hashes: Sequence[bytes], num_blocks: int) -> list[int] | None:
        return self._cached_hits(block_hashes, max(0, num_blocks - self.blocks_in_window), num_blocks)

    def _cached_hits(self, block_hashes: Sequence[bytes], first: int, stop: int) -> list[int] | None:
        """Cached blocks named block_hashes[first:stop], or None if one is not cached."""
        hits = [self.pool.lookup(block_hash) for block_hash in block_hashes[first:max(first, stop)]]
        return None if None in hits else hits

    # --- allocation ----------------------------------------------------------------------------
    def can_allocate(self, request_id: str, num_tokens: int, hit_blocks: int = 0,
                     block_hashes: Sequence[bytes] = (), restored_blocks: int = 0) -> bool:
        table = self._block_tables.get(request_id)
        if table is not None:
            return self._blocks_for(num_tokens) - len(table) <= self.pool.num_free_blocks
        first_live = max(0, hit_blocks - self.blocks_in_window)
        hits = self._cached_hits(block_hashes, first_live, hit_blocks - restored_blocks) or []
        num_hits_on_free = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        num_new = max(0, self._blocks_for(num_tokens) - first_live - len(hits))
        return num_new + num_hits_on_free <= self.pool.num_free_blocks

    def allocate_slots(self, request_id: str, num_tokens: int, hit_blocks: int = 0,
                       block_hashes: Sequence[bytes] = (), restored_blocks: int = 0) -> list[int] | None:
        """Grow the table to cover `num_tokens` tokens; on the first call the prefix of
        `hit_blocks` blocks heads it, nulls before its window: cached blocks (from
        `servable_prefix`), then fresh ones for the last `restored_blocks` (a tier fills them).
        Returns the new block ids, or None (nothing changed) when the pool is short."""
        if not self.can_allocate(request_id, num_tokens, hit_blocks, block_hashes, restored_blocks):
            return None
        table = self._block_tables.get(request_id)
        if table is None:
            first_live = max(0, hit_blocks - self.blocks_in_window)
            hits = self._cached_hits(block_hashes, first_live, hit_blocks - restored_blocks)
            if hits is None:
                raise ValueError(f"request {request_id!r}: a window block of its prefix hit was evicted")
            self.pool.retain(hits)
            table = self._block_tables[request_id] = [NULL_BLOCK] * first_live + hits
            self._num_marked[request_id] = first_live + len(hits)  # restored blocks are named once loaded
        new_block_ids = self.pool.allocate(max(0, self._blocks_for(num_tokens) - len(table)))
        table.extend(new_block_ids)
        return new_block_ids

    def cache_full_blocks(self, request_id: str, block_hashes: Sequence[bytes], num_computed_tokens: int) -> None:
        """Name the request's newly full blocks by hash (before they can leave the window)."""
        if not self.enable_prefix_caching:
            return
        table, num_full = self._block_tables[request_id], num_computed_tokens // self.block_size
        for index in range(self._num_marked[request_id], min(num_full, len(block_hashes))):
            if table[index] != NULL_BLOCK:
                self.pool.mark_cached(table[index], block_hashes[index])
        self._num_marked[request_id] = max(self._num_marked[request_id], num_full)

    def release_before(self, request_id: str, next_token: int) -> list[int]:
        """Free the blocks no chunk starting at `next_token` can read; returns their ids."""
        table = self._block_tables[request_id]
        num_dead = max(0, next_token - self.window_tokens) // self.block_size
        dead = [block_id for block_id in table[:num_dead] if block_id != NULL_BLOCK]
        table[:num_dead] = [NULL_BLOCK] * num_dead
        self.pool.release(reversed(dead))
        return dead

    def block_table(self, request_id: str) -> list[int]:
        return self._block_tables[request_id]

    def free(self, request_id: str) -> None:
        table = self._block_tables.pop(request_id, None)
        if table is None:
            return
        del self._num_marked[request_id]
        self.pool.release(b for b in reversed(table) if b != NULL_BLOCK)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
