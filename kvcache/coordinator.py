"""The one object the scheduler asks about KV memory: the KV-cache coordinator. No tensors.

In the spirit of vLLM's KV connector, the scheduler sees four questions and nothing of the tiers
behind them:

  lookup(request)              -> PrefixHit (device blocks to share + host blocks to restore,
                                  and where to pause if the rest is fetched meanwhile),
                                  or None: wait, its prefix is on its way from Redis
  allocate(request, n, hit)    -> new block ids covering n tokens, or None (nothing changed)
  free(request_id)             finish, abort or preemption
  on_tokens_computed(request)  after each step: name the newly full blocks (prefix cache) and
                               write them through to the tiers

and, at the step boundary, `take_transfers` (the moves riding on the StepInput) and
`on_step_done` (the worker's report). Behind it: the device block pool and per-request block
tables (kv_cache_manager.py), the host / Redis tiers with the prefetcher and the cost model
(tier_manager.py), and metrics through the tiers' observer (tier_metrics.py).

Block groups (kvcache/block_groups.py). A dense model keeps one kind of KV: one group, one pool,
one table per request. A hybrid model (DeepSeek-V4: raw KV of a sliding window next to compressed
entries) adds groups that share the block size and the prefix hashes but keep their own pools:
a hit is the longest prefix that every group can serve, an allocation succeeds in every group
or in none, and a sliding-window group frees the blocks that leave its window. The step message
carries one block table per group (group 0 first). The host / Redis tiers back group 0; with one
sliding-window group beside it (DeepSeek-V4) block i's window part has its own smaller host pool
and Redis key, kept where restores end (kvcache/tiers/window_parts.py: a restored prefix resumes
from its window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.config import ConfigError, KVTierSettings, LongctxConfig
from kvcache.block_groups import BlockGroup, KVCacheGroupSpec, make_group
from kvcache.kv_cache_manager import KVCacheManager
from kvcache.tier_manager import RestorePlan, TieredRequest, TierManager, StepLike
from kvcache.tier_metrics import TierMetrics
from kvcache.tiers.cost_model import PrefillFlops
from protocol.kv_transfer_ops import KVTransferOps, KVTransferReport
from protocol.worker_description import WorkerDescription


@dataclass(frozen=True)
class PrefixHit:
    """What the caches hold of a request's prompt, left to right (at least the last prompt
    token is always computed):

      | device blocks (shared) | host blocks (restored into new device blocks) | computed |
      0                        len(device_block_ids)                           num_tokens / block
    """

    device_block_ids: tuple[int, ...]  # group 0's; every other group serves the same prefix
    restore: RestorePlan

    @property
    def num_tokens(self) -> int:
        return len(self.device_block_ids) * self.restore.block_size + self.restore.num_tokens

    @property
    def host_tokens(self) -> int:
        return self.restore.host_tokens

    @property
    def redis_tokens(self) -> int:
        return self.restore.redis_tokens

    @property
    def pause_at_tokens(self) -> int | None:
        """The prefill stops here, and the request goes back to the queue to restore what follows
        (fetched from Redis while it computed up to here); None: no pause."""
        pause = self.restore.pause_block
        return None if pause is None else pause * self.restore.block_size


NewBlocks = tuple[list[int], ...]  # the block ids an allocation added, per group (group 0 first)


class KVCacheCoordinator:
    def __init__(self, device: KVCacheManager, tiers: TierManager | None = None,
                 extra_groups: Sequence[BlockGroup] = ()):
        """`device`: group 0 (full attention; the tiers back it); `extra_groups`: a hybrid
        model's other kinds of KV (kvcache/block_groups.py)."""
        self.device = device
        self.tiers = tiers or TierManager.disabled(device.block_size)
        self.extra_groups = tuple(extra_groups)
        window_groups = [g for g in self.extra_groups if g.spec.kind == "sliding_window"]
        if self.tiers.host is not None and (len(self.extra_groups) > 1 or len(window_groups) != len(self.extra_groups)):
            raise ConfigError("kv_tiers: the host and Redis tiers back one kind of KV, or a sliding window beside it")

    @classmethod
    def from_config(cls, config: LongctxConfig, workers: WorkerDescription, flops: PrefillFlops | None = None,
                    extra_groups: Sequence[tuple[KVCacheGroupSpec, int]] = ()) -> KVCacheCoordinator:
        """The device pool the workers allocated, with the configured tiers below it;
        `extra_groups`: (spec, number of blocks) of a hybrid model's other kinds of KV."""
        block_size, prefix_caching = config.cache.block_size, config.cache.enable_prefix_caching
        # Without prefix caching no block has a name, so no tier could ever find one.
        tier_settings = config.kv_tiers if prefix_caching else KVTierSettings()
        groups = [make_group(spec, num_blocks, block_size, prefix_caching) for spec, num_blocks in extra_groups]
        window_blocks = sum(group.manager.blocks_in_window for group in groups if group.spec.kind == "sliding_window")
        tiers = TierManager(tier_settings, block_size, workers.kv_block_nbytes, flops=flops,
                            chunk_tokens=config.scheduler.max_tokens_per_step, window_blocks=window_blocks,
                            window_nbytes=workers.kv_window_nbytes)
        device = KVCacheManager(workers.num_kv_blocks, block_size, prefix_caching, on_evict=tiers.on_device_evict)
        tiers.track_device(device.pool)
        return cls(device, tiers, groups)

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.device.block_size

    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.device.num_free_blocks

    @property
    def host_tier_tokens(self) -> int:
        """Tokens the host-memory tier holds when full (0: no host tier)."""
        return self.tiers.host.num_slots * self.block_size if self.tiers.host is not None else 0

    @property
    def redis_up(self) -> bool | None:
        """None without a Redis tier; else whether it answered the workers' last ping."""
        return self.tiers.redis_up if self.tiers.redis_enabled else None

    @property
    def metrics(self) -> TierMetrics:
        """Hit rates, transfers and decisions of every tier: the tiers' observer, TierMetrics
        (a Prometheus registry inside) unless the tiers were given another one."""
        return self.tiers.metrics

    def block_table(self, request_id: str) -> list[int]:
        """The request's group-0 blocks in token order (the manager's own list: do not mutate)."""
        return self.device.block_table(request_id)

    def block_tables(self, request_id: str) -> tuple[tuple[int, ...], ...]:
        """Every group's table, group 0 first (a sliding window's holds NULL_BLOCK where freed)."""
        return (tuple(self.device.block_table(request_id)),
                *(tuple(group.block_table(request_id)) for group in self.extra_groups))

    # --- the scheduler's questions -------------------------------------------------------------
    def lookup(self, request: TieredRequest, may_probe: bool = True) -> PrefixHit | None:
        """The longest cached prefix, or None while the request waits for Redis (or, with
        `may_probe` False, would have to start asking it). The device blocks found are not held:
        pass the hit straight to `allocate`."""
        device_blocks, _ = self.device.find_cached_prefix(request.block_hashes, request.num_tokens)
        num_blocks = len(device_blocks)
        for group in self.extra_groups:  # the prefix every group can serve
            num_blocks = group.servable_prefix(request.block_hashes, num_blocks)
        restore = self.tiers.plan_restore(request, num_blocks, may_probe)
        if restore is None:
            return None
        return PrefixHit(tuple(device_blocks[:num_blocks]), restore)

    def miss(self, request: TieredRequest) -> PrefixHit:
        """No prefix served from any cache: for a request that needs every prompt row computed
        (prompt logprobs). Its blocks are still named and shared once computed."""
        return PrefixHit((), RestorePlan(request.request_id, self.block_size, 0, 0))

    def allocate(self, request: TieredRequest, num_tokens: int, hit: PrefixHit | None = None) -> NewBlocks | None:
        """Grow the request's blocks to cover `num_tokens` tokens, in every group or in none.
        On its first allocation `hit` (from `lookup`) heads its tables and its host blocks are
        queued for restore. None when a group is short: nothing changed (a hit's restore is
        released)."""
        if hit is None and not self.extra_groups:  # a running request's growth: one group, no restore
            new_blocks = self.device.allocate_slots(request.request_id, num_tokens)  # None: nothing changed
            return None if new_blocks is None else (new_blocks,)
        device_hits = hit.device_block_ids if hit is not None else ()
        if not self._can_allocate(request, num_tokens, device_hits, len(hit.restore.slots) if hit else 0):
            if hit is not None:
                self.tiers.cancel(hit.restore)
            return None
        new_blocks = self.device.allocate_slots(request.request_id, num_tokens, device_hits)
        restored = len(hit.restore.slots) if hit is not None else 0
        extra = [group.allocate(request.request_id, num_tokens, len(device_hits) + restored, request.block_hashes,
                                restored) for group in self.extra_groups]
        if hit is not None:  # restores land in the new blocks of every group
            self.tiers.commit(hit.restore, new_blocks, self._window_table(request.request_id))
        return (new_blocks, *extra)

    def _window_table(self, request_id: str) -> list[int]:
        return self.extra_groups[0].block_table(request_id) if self.extra_groups else []

    def _can_allocate(self, request: TieredRequest, num_tokens: int, device_hits: Sequence[int],
                      restored: int = 0) -> bool:
        return self.device.can_allocate(request.request_id, num_tokens, device_hits) and all(
            group.can_allocate(request.request_id, num_tokens, len(device_hits) + restored, request.block_hashes,
                               restored)
            for group in self.extra_groups)

    def free(self, request_id: str) -> None:
        """Release the request's blocks; its cached ones stay findable until reused."""
        self.device.free(request_id)
        for group in self.extra_groups:
            group.free(request_id)

    def on_tokens_computed(self, request: TieredRequest) -> None:
        """Name the request's newly full blocks, write them through to the tiers, and let a
        sliding window free what it no longer reads."""
        self.device.cache_full_blocks(request.request_id, request.block_hashes, request.num_computed_tokens)
        self.tiers.on_blocks_computed(request, self.device.block_table(request.request_id),
                                      self._window_table(request.request_id))
        for group in self.extra_groups:
            group.on_tokens_computed(request.request_id, request.block_hashes, request.num_computed_tokens)

    # --- the step boundary -----------------------------------------------------------------------
    def take_transfers(self, dropped_request_ids: Sequence[str], idle: bool) -> KVTransferOps | None:
        """This step's moves between tiers; None when nothing moves and nothing is in flight."""
        return self.tiers.take_ops(dropped_request_ids, idle)

    def on_step_done(self, step_input: StepLike, report: KVTransferReport | None, seconds: float,
                     synced: bool = True) -> None:
        """The workers ran the step: apply their transfer report, learn the prefill rate. `synced`:
        the step waited for the device (it sampled a token)."""
        self.tiers.on_step_done(step_input, report, seconds, synced)

    @property
    def has_queued_transfers(self) -> bool:
        """Moves decided but not yet sent to the workers (one more step is needed)."""
        return self.tiers.has_queued_ops

    @property
    def num_pending_transfers(self) -> int:
        """Host slots held by transfers in flight (0 when idle: nothing leaked)."""
        return self.tiers.num_pending
