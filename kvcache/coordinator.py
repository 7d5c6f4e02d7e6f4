"""The one object the scheduler asks about KV memory: the KV-cache coordinator. No tensors.

In the spirit of vLLM's KV connector, the scheduler sees four questions and nothing of the tiers
behind them:

  lookup(request)              -> PrefixHit (device blocks to share + host blocks to restore),
                                  or None: wait, its prefix is on its way from Redis
  allocate(request, n, hit)    -> new block ids covering n tokens, or None (nothing changed)
  free(request_id)             finish, abort or preemption
  on_tokens_computed(request)  after each step: name the newly full blocks (prefix cache) and
                               write them through to the tiers

and, at the step boundary, `take_transfers` (the moves riding on the StepInput) and
`on_step_done` (the worker's report). Behind it: the device block pool and per-request block
tables (kv_cache_manager.py), the host / Redis tiers with the prefetcher and the cost model
(tier_manager.py), and metrics through the tiers' observer (tier_metrics.py).

Block groups. Every model today keeps one kind of KV per layer, so there is one group: one pool,
one table per request, one block size. A hybrid model (DeepSeek-V4: a sliding window of raw KV
next to compressed entries) adds groups that share the block size and the block hashes but keep
their own pools: a hit is then the longest prefix that every group can serve, and a sliding
group frees the blocks that leave its window. `KVCacheGroupSpec` names the group kinds; the
coordinator is the only place that would combine them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from cluster.config import KVTierSettings, LongctxConfig
from kvcache.kv_cache_manager import KVCacheManager
from kvcache.tier_manager import RestorePlan, TierManager
from kvcache.tier_metrics import TierMetrics
from kvcache.tiers.cost_model import PrefillFlops
from protocol.kv_transfer_ops import KVTransferOps, KVTransferReport
from protocol.worker_description import WorkerDescription


@dataclass(frozen=True)
class KVCacheGroupSpec:
    """One kind of KV a model keeps: `full` holds every token's entry; `sliding_window` only the
    blocks covering the last `window_tokens` tokens (older ones are freed as the window moves)."""

    name: str
    kind: Literal["full", "sliding_window"] = "full"
    window_tokens: int | None = None


FULL_ATTENTION = KVCacheGroupSpec("full_attention")


class CachedRequest(Protocol):
    request_id: str
    block_hashes: list[bytes]
    num_tokens: int
    num_computed_tokens: int


class _StepLike(Protocol):
    @property
    def total_scheduled_tokens(self) -> int: ...

    def scheduled_spans(self): ...


@dataclass(frozen=True)
class PrefixHit:
    """What the caches hold of a request's prompt, left to right (at least the last prompt
    token is always computed):

      | device blocks (shared) | host blocks (restored into new device blocks) | computed |
      0                        len(device_block_ids)                           num_tokens / block
    """

    device_block_ids: tuple[int, ...]
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


class KVCacheCoordinator:
    def __init__(self, device: KVCacheManager, tiers: TierManager | None = None,
                 groups: Sequence[KVCacheGroupSpec] = (FULL_ATTENTION,)):
        if tuple(groups) != (FULL_ATTENTION,):
            raise NotImplementedError("several KV block groups: only one full-attention group is served yet")
        self.device = device
        self.tiers = tiers or TierManager.disabled(device.block_size)
        self.groups = tuple(groups)

    @classmethod
    def from_config(cls, config: LongctxConfig, workers: WorkerDescription,
                    flops: PrefillFlops | None = None) -> KVCacheCoordinator:
        """The device pool the workers allocated, with the configured tiers below it."""
        # Without prefix caching no block has a name, so no tier could ever find one.
        tier_settings = config.kv_tiers if config.cache.enable_prefix_caching else KVTierSettings()
        tiers = TierManager(tier_settings, config.cache.block_size, workers.kv_block_nbytes, flops=flops)
        device = KVCacheManager(workers.num_kv_blocks, config.cache.block_size,
                                config.cache.enable_prefix_caching, on_evict=tiers.on_device_evict)
        tiers.track_device(device.pool)
        return cls(device, tiers)

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
    def metrics(self) -> TierMetrics:
        """Hit rates, transfers and decisions of every tier (a Prometheus registry inside)."""
        return self.tiers.metrics

    def block_table(self, request_id: str) -> list[int]:
        """The request's device blocks in token order (the manager's own list: do not mutate)."""
        return self.device.block_table(request_id)

    # --- the scheduler's questions -------------------------------------------------------------
    def lookup(self, request: CachedRequest, may_probe: bool = True) -> PrefixHit | None:
        """The longest cached prefix, or None while the request waits for Redis (or, with
        `may_probe` False, would have to start asking it). The device blocks found are not held:
        pass the hit straight to `allocate`."""
        device_blocks, _ = self.device.find_cached_prefix(request.block_hashes, request.num_tokens)
        restore = self.tiers.plan_restore(request, len(device_blocks), may_probe)
        if restore is None:
            return None
        return PrefixHit(tuple(device_blocks), restore)

    def miss(self, request: CachedRequest) -> PrefixHit:
        """No prefix served from any cache: for a request that needs every prompt row computed
        (prompt logprobs). Its blocks are still named and shared once computed."""
        return PrefixHit((), RestorePlan(request.request_id, self.block_size, 0, 0))

    def allocate(self, request: CachedRequest, num_tokens: int, hit: PrefixHit | None = None) -> list[int] | None:
        """Grow the request's blocks to cover `num_tokens` tokens. On its first allocation `hit`
        (from `lookup`) heads its table and its host blocks are queued for restore. None when the
        device is short, in which case nothing changed (a hit's restore is released)."""
        if hit is None:
            return self.device.allocate_slots(request.request_id, num_tokens)
        new_blocks = self.device.allocate_slots(request.request_id, num_tokens, hit.device_block_ids)
        if new_blocks is None:
            self.tiers.cancel(hit.restore)
        else:
            self.tiers.commit(hit.restore, new_blocks)
        return new_blocks

    def free(self, request_id: str) -> None:
        """Release the request's blocks; its cached ones stay findable until reused."""
        self.device.free(request_id)

    def on_tokens_computed(self, request: CachedRequest) -> None:
        """Name the request's newly full blocks and write them through to the tiers."""
        self.device.cache_full_blocks(request.request_id, request.block_hashes, request.num_computed_tokens)
        self.tiers.on_blocks_computed(request, self.device.block_table(request.request_id))

    # --- the step boundary -----------------------------------------------------------------------
    def take_transfers(self, dropped_request_ids: Sequence[str], idle: bool) -> KVTransferOps | None:
        """This step's moves between tiers; None when nothing moves and nothing is in flight."""
        return self.tiers.take_ops(dropped_request_ids, idle)

    def on_step_done(self, step_input: _StepLike, report: KVTransferReport | None, seconds: float) -> None:
        """The workers ran the step: apply their transfer report, learn the prefill rate."""
        self.tiers.on_step_done(step_input, report, seconds)

    @property
    def has_queued_transfers(self) -> bool:
        """Moves decided but not yet sent to the workers (one more step is needed)."""
        return self.tiers.has_queued_ops

    @property
    def num_pending_transfers(self) -> int:
        """Host slots held by transfers in flight (0 when idle: nothing leaked)."""
        return self.tiers.num_pending
