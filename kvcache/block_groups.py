"""The KV-cache coordinator's block groups: one kind of KV each, one uniform face.

Every model keeps at least one `full` group (every token's KV, prefix-cached and backed by the
host / Redis tiers). A hybrid model adds groups that share the block size and the prefix hashes
but keep their own pools: `sliding_window` (raw KV only a window reads, freed as it moves:
kvcache/sliding_window_manager.py) or more `full` ones (e.g. compressed entries in their own
pool). The coordinator asks every group the same questions through `BlockGroup`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from kvcache.kv_cache_manager import KVCacheManager
from kvcache.sliding_window_manager import SlidingWindowManager


@dataclass(frozen=True)
class KVCacheGroupSpec:
    """One kind of KV a model keeps: `full` holds every token's entry; `sliding_window` only the
    blocks covering the last `window_tokens` tokens."""

    name: str
    kind: Literal["full", "sliding_window"] = "full"
    window_tokens: int | None = None


FULL_ATTENTION = KVCacheGroupSpec("full_attention")


def extra_group_specs(architecture) -> tuple[KVCacheGroupSpec, ...]:
    """A model's KV groups after group 0. DeepSeek-V4: group 0 holds the compressed entries (and
    indexer keys, and the overlap state at each block's end: kind full, prefix-cached); one more
    holds every layer's raw K(=V), read only by the sliding window of W - 1 tokens before a query.
    A dense model has none."""
    if architecture.architecture != "deepseek_v4":
        return ()
    return (KVCacheGroupSpec("window", "sliding_window", architecture.sliding_window - 1),)


class BlockGroup(Protocol):
    spec: KVCacheGroupSpec

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...

    def servable_prefix(self, block_hashes: Sequence[bytes], max_blocks: int) -> int:
        """The longest prefix (in blocks, at most `max_blocks`) this group can serve from cache."""

    def can_allocate(self, request_id: str, num_tokens: int, hit_blocks: int, block_hashes: Sequence[bytes],
                     restored_blocks: int = 0) -> bool:
        """`hit_blocks`: the prefix hit, its last `restored_blocks` restored from a KV tier."""

    def allocate(self, request_id: str, num_tokens: int, hit_blocks: int, block_hashes: Sequence[bytes],
                 restored_blocks: int = 0) -> list[int] | None: ...

    def on_tokens_computed(self, request_id: str, block_hashes: Sequence[bytes], num_computed_tokens: int) -> None: ...

    def block_table(self, request_id: str) -> list[int]: ...

    def free(self, request_id: str) -> None: ...


class _ManagedGroup:
    """What every group does the same way: sizes, tables and freeing, read from its manager."""

    def __init__(self, spec: KVCacheGroupSpec, manager):
        self.spec, self.manager = spec, manager

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.manager.block_table(request_id)

    def free(self, request_id: str) -> None:
        self.manager.free(request_id)


class FullGroup(_ManagedGroup):
    """Every token's KV: a KVCacheManager."""

    manager: KVCacheManager

    def servable_prefix(self, block_hashes: Sequence[bytes], max_blocks: int) -> int:
        return len(self._hits(block_hashes, max_blocks))

    def _hits(self, block_hashes: Sequence[bytes], num_blocks: int) -> list[int]:
        hits = []
        for block_hash in block_hashes[:num_blocks]:
            block_id = self.manager.pool.lookup(block_hash)
            if block_id is None or not self.manager.enable_prefix_caching:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, request_id, num_tokens, hit_blocks, block_hashes, restored_blocks=0) -> bool:
        cached = self._hits(block_hashes, hit_blocks - restored_blocks)  # restored ones: new blocks
        return self.manager.can_allocate(request_id, num_tokens, cached)

    def allocate(self, request_id, num_tokens, hit_blocks, block_hashes, restored_blocks=0) -> list[int] | None:
        cached = self._hits(block_hashes, hit_blocks - restored_blocks)
        return self.manager.allocate_slots(request_id, num_tokens, cached)

    def on_tokens_computed(self, request_id, block_hashes, num_computed_tokens) -> None:
        self.manager.cache_full_blocks(request_id, block_hashes, num_computed_tokens)


class SlidingWindowGroup(_ManagedGroup):
    """Raw KV that only a sliding window reads: a SlidingWindowManager."""

    manager: SlidingWindowManager

    def servable_prefix(self, block_hashes: Sequence[bytes], max_blocks: int) -> int:
        return self.manager.servable_prefix(block_hashes, max_blocks)

    def can_allocate(self, request_id, num_tokens, hit_blocks, block_hashes, restored_blocks=0) -> bool:
        return self.manager.can_allocate(request_id, num_tokens, hit_blocks, block_hashes, restored_blocks)

    def allocate(self, request_id, num_tokens, hit_blocks, block_hashes, restored_blocks=0) -> list[int] | None:
        return self.manager.allocate_slots(request_id, num_tokens, hit_blocks, block_hashes, restored_blocks)

    def on_tokens_computed(self, request_id, block_hashes, num_computed_tokens) -> None:
        """Name the full blocks first, then free what the next chunk can no longer read."""
        self.manager.cache_full_blocks(request_id, block_hashes, num_computed_tokens)
        self.manager.release_before(request_id, num_computed_tokens)


def make_group(spec: KVCacheGroupSpec, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> BlockGroup:
    if spec.kind == "sliding_window":
        return SlidingWindowGroup(spec, SlidingWindowManager(num_blocks, block_size, spec.window_tokens or 0,
                                                             enable_prefix_caching))
    return FullGroup(spec, KVCacheManager(num_blocks, block_size, enable_prefix_caching))
