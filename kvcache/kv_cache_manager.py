"""Per-request block tables over one BlockPool, with automatic prefix caching.

The scheduler drives one request through these calls:

  1. `find_cached_prefix(hashes, n_prompt)`   leading full blocks already in the pool (no retain)
  2. `allocate_slots(rid, n, cached_ids)`     retain those, allocate the rest, or change nothing
  3. `cache_full_blocks(rid, hashes, n_done)` after each step: name the blocks it completed
  4. `allocate_slots(rid, n)`                 as the request grows (chunked prefill, decode)
  5. `free(rid)`                              finish, abort or preemption

A request's block table, left to right:

    | prefix-cache hit | marked cached | full, not marked yet | partial / being computed |
    0                  hit blocks      _num_marked            num_computed // block_size  len

Blocks left of `_num_marked[rid]` are findable by hash; `cache_full_blocks` only walks the
blocks between `_num_marked` and the new full-block count, so a 1M-token request costs O(new
blocks) per step, not O(its length).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from kvcache.block_pool import BlockPool, EvictCallback


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        on_evict: EvictCallback | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, on_evict)
        self._block_tables: dict[str, list[int]] = {}
        self._num_marked: dict[str, int] = {}  # leading blocks of each request known to the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (evictable cached blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def find_cached_prefix(
        self, block_hashes: Sequence[bytes], num_prompt_tokens: int
    ) -> tuple[list[int], int]:
        """The longest run of leading blocks found in the pool: (block ids, hit tokens).

        Stops one token short of the whole prompt: the model must compute at least the last
        prompt token to produce the logits of the first output token. Does not retain, so the ids
        are valid only until the next allocation: pass them straight to `allocate_slots`.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = max(0, (num_prompt_tokens - 1) // self.block_size)
        hit_block_ids = self.pool.lookup_run(islice(block_hashes, max_hit_blocks))
        return hit_block_ids, len(hit_block_ids) * self.block_size

    def allocate_slots(
        self, request_id: str, num_tokens: int, cached_block_ids: Sequence[int] = ()
    ) -> list[int] | None:
        """Grow the request's block table to cover `num_tokens` tokens in total.

        On a request's first call, `cached_block_ids` (from `find_cached_prefix`) are retained and
        head its table. Returns the newly allocated block ids (cached ones not included; possibly
        empty), or None when the pool is short, in which case nothing changed.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        block_table = self._block_tables.get(request_id)
        if block_table is None:
            return self._admit(request_id, num_tokens, cached_block_ids)
        if cached_block_ids:
            raise ValueError(f"request {request_id!r} already has blocks; cached ids come first")
        num_new = self._blocks_for(num_tokens) - len(block_table)
        if num_new <= 0:  # a decode step inside its last block: most steps
            return []
        if num_new > self.pool.num_free_blocks:
            return None
        new_block_ids = self.pool.allocate(num_new)
        block_table.extend(new_block_ids)
        return new_block_ids

    def cache_full_blocks(
        self, request_id: str, block_hashes: Sequence[bytes], num_computed_tokens: int
    ) -> None:
        """Make the request's first `num_computed_tokens // block_size` blocks findable by hash.

        `block_hashes[i]` names block i of the request. Blocks marked on an earlier call are
        skipped. A block whose hash another block already holds stays uncached (first one wins).
        """
        if not self.enable_prefix_caching:
            return
        block_table = self._block_tables[request_id]
        num_full = num_computed_tokens // self.block_size
        num_marked = self._num_marked[request_id]
        if num_full <= num_marked:
            return
        if num_full > len(block_table) or num_full > len(block_hashes):
            raise ValueError(
                f"request {request_id!r}: {num_full} full blocks, but {len(block_table)} blocks "
                f"and {len(block_hashes)} hashes"
            )
        for index in range(num_marked, num_full):
            self.pool.mark_cached(block_table[index], block_hashes[index])
        self._num_marked[request_id] = num_full

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks in token order. The manager's own list: do not mutate it."""
        return self._block_tables[request_id]

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first so its shared prefix is evicted last.

        Its cached blocks stay findable until reused. An unknown request is a no-op.
        """
        block_table = self._block_tables.pop(request_id, None)
        if block_table is None:
            return
        del self._num_marked[request_id]
        self.pool.release(reversed(block_table))

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks that `allocate_slots(request_id, num_tokens)` would allocate.

        For a request not yet admitted, prefix-cache hits are not subtracted.
        """
        num_held = len(self._block_tables.get(request_id, ()))
        return max(0, self._blocks_for(num_tokens) - num_held)

    def can_allocate(self, request_id: str, num_tokens: int, cached_block_ids: Sequence[int] = ()) -> bool:
        """Whether `allocate_slots` with the same arguments would succeed."""
        block_table = self._block_tables.get(request_id)
        if block_table is not None:
            return self._blocks_for(num_tokens) - len(block_table) <= self.pool.num_free_blocks
        num_new = max(0, self._blocks_for(num_tokens) - len(cached_block_ids))
        # A hit on a free cached block takes it out of the free queue, so it costs a free block
        # just like a new allocation does.
        num_hits_on_free = self.pool.num_free_among(cached_block_ids)
        return num_new + num_hits_on_free <= self.pool.num_free_blocks

    def _admit(
        self, request_id: str, num_tokens: int, cached_block_ids: Sequence[int]
    ) -> list[int] | None:
        # A hit is only valid if no allocation evicted it since find_cached_prefix found it.
        if not self.pool.all_cached(cached_block_ids):
            raise ValueError(f"request {request_id!r}: a prefix-cache hit was evicted meanwhile")
        if not self.can_allocate(request_id, num_tokens, cached_block_ids):
            return None
        num_new = max(0, self._blocks_for(num_tokens) - len(cached_block_ids))
        self.pool.retain(cached_block_ids)
        new_block_ids = self.pool.allocate(num_new)
        self._block_tables[request_id] = list(cached_block_ids) + new_block_ids
        # Prefix hits are cached already: cache_full_blocks starts after them.
        self._num_marked[request_id] = len(cached_block_ids)
        return new_block_ids

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
