"""What the KV tiers report as they work: the observer the tier policy talks to.

The policy (tier_manager.py, tiers/prefetch.py) calls these hooks and knows nothing of how they
are kept; `tier_metrics.TierMetrics` keeps them as Prometheus series. A test or a bench can pass
its own observer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvcache.tiers.cost_model import Decision, RestoreCostModel
from protocol.kv_transfer_ops import KVTransferReport


class TierObserver(Protocol):
    def track_tier(self, tier: str, num_blocks: Callable[[], int], block_nbytes: int) -> None:
        """A tier's size, read whenever the observer wants it."""

    def record_lookup(self, tier: str, hit_tokens: int, miss_tokens: int) -> None: ...

    def record_decision(self, decision: Decision) -> None:
        """A restore-or-recompute decision with its two estimates."""

    def record_report(self, report: KVTransferReport) -> None:
        """A worker's transfer report for one step."""

    def record_estimates(self, cost: RestoreCostModel) -> None:
        """The cost model's current bandwidth and prefill-rate estimates."""

    def record_spill_dropped(self) -> None:
        """An evicted device block was not copied to host: every host slot was in use."""

    def record_redis_write_dropped(self) -> None:
        """A block leaving host memory could not be written to Redis (Redis down)."""

    def record_prefetch_timeout(self) -> None:
        """A request stopped waiting for its Redis prefetch."""
