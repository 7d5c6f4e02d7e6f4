"""Prometheus metrics of the KV tiers: `longctx_kv_` prefix, base units, one registry per engine.

The registry is passed in (or made here), never the process-wide default, so two engines in one
process export separate series. Worker-side counts (bytes moved, Redis errors, fetch outcomes)
arrive in each step's KVTransferReport and are added here, in the driver.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvcache.tiers.cost_model import Decision, RestoreCostModel
from protocol.kv_transfer_ops import CHECKSUM, MISMATCH, TRUNCATED, UNAUTHENTIC, KVTransferReport

_FAILED_VERIFICATION = (CHECKSUM, TRUNCATED, MISMATCH, UNAUTHENTIC)


class TierMetrics:
    """The `kvcache.tier_observer.TierObserver` that keeps Prometheus series."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._define_tier_series()
        self._define_transfer_series()
        self._define_redis_series()

    def _define_tier_series(self) -> None:
        r = self.registry
        self.tier_blocks = Gauge("longctx_kv_tier_blocks", "KV blocks held, by tier (device: findable "
                                 "by hash; host: filled slots).", ["tier"], registry=r)
        self.tier_bytes = Gauge("longctx_kv_tier_bytes", "KV bytes held, by tier.", ["tier"], registry=r)
        self.hit_tokens = Counter("longctx_kv_hit_tokens", "Prompt tokens served from a tier at admission.",
                                  ["tier"], registry=r)
        self.miss_tokens = Counter("longctx_kv_miss_tokens", "Prompt tokens looked up in a tier and not "
                                   "served from it.", ["tier"], registry=r)
        self.decisions = Counter("longctx_kv_restore_decisions", "Restore-or-recompute decisions, by tier "
                                 "and outcome (restore, recompute).", ["tier", "decision"], registry=r)
        self.spills_dropped = Counter("longctx_kv_spills_dropped", "Evicted device blocks not copied to "
                                      "host: every host slot was in use.", registry=r)

    def _define_transfer_series(self) -> None:
        r = self.registry
        self.transfer_bytes = Counter("longctx_kv_transfer_bytes", "Bytes moved between tiers, by path.",
                                      ["path"], registry=r)
        self.transfer_seconds = Counter("longctx_kv_transfer_seconds", "Wall time of tier transfers, by path.",
                                        ["path"], registry=r)
        self.bandwidth = Gauge("longctx_kv_bandwidth_estimate_bytes_per_second", "Measured bandwidth (EMA "
                               "of the worker's timed batches), by path.", ["path"], registry=r)
        self.prefill_rate = Gauge("longctx_kv_prefill_estimate_flops_per_second", "Prefill-speed estimate used "
                                  "by the restore decisions: weight FLOPs per second of a prefill step.", registry=r)
        self.redis_overhead = Gauge("longctx_kv_redis_restore_overhead_estimate_seconds", "Fixed part of the "
                                    "Redis restore estimate: probe and fetch round trips, engine steps between.",
                                    registry=r)

    def _define_redis_series(self) -> None:
        r = self.registry
        self.fetch_outcomes = Counter("longctx_kv_redis_fetches", "Blocks fetched from Redis, by outcome "
                                      "(hit, missing, checksum, truncated, mismatch, unauthentic).", ["outcome"],
                                      registry=r)
        self.checksum_failures = Counter("longctx_kv_checksum_failures", "Fetched values that failed "
                                         "verification (checksum, length, header, MAC) and were recomputed.", registry=r)
        self.unauthentic_blocks = Counter("longctx_kv_unauthentic_blocks", "Fetched values whose MAC did not "
                                          "verify (forged, or copied from another block or namespace): someone "
                                          "without the key wrote to Redis. Each was recomputed.", registry=r)
        self.prefetch_timeouts = Counter("longctx_kv_prefetch_timeouts", "Requests that stopped waiting for "
                                         "their Redis prefetch.", registry=r)
        self.redis_writes = Counter("longctx_kv_redis_writes", "Blocks written to Redis, by result (stored, "
                                    "dropped).", ["result"], registry=r)
        self.redis_errors = Counter("longctx_kv_redis_errors", "Failed Redis calls.", registry=r)
        self.redis_up = Gauge("longctx_kv_redis_up", "1 while every Redis shard answers.", registry=r)

    # --- recording --------------------------------------------------------------------------
    def track_tier(self, tier: str, num_blocks: Callable[[], int], block_nbytes: int) -> None:
        """Read a tier's size at scrape time (no bookkeeping on the hot path)."""
        self.tier_blocks.labels(tier).set_function(lambda: num_blocks())
        self.tier_bytes.labels(tier).set_function(lambda: num_blocks() * block_nbytes)

    def record_lookup(self, tier: str, hit_tokens: int, miss_tokens: int) -> None:
        self.hit_tokens.labels(tier).inc(hit_tokens)
        self.miss_tokens.labels(tier).inc(miss_tokens)

    def record_decision(self, decision: Decision) -> None:
        self.decisions.labels(decision.tier, "restore" if decision.restore else "recompute").inc()

    def record_report(self, report: KVTransferReport) -> None:
        for sample in report.transfers:
            self.transfer_bytes.labels(sample.path).inc(sample.nbytes)
            self.transfer_seconds.labels(sample.path).inc(sample.seconds)
        for _, outcome in report.fetched:
            self.fetch_outcomes.labels(outcome).inc()
            if outcome in _FAILED_VERIFICATION:
                self.checksum_failures.inc()
            if outcome == UNAUTHENTIC:
                self.unauthentic_blocks.inc()
        self.redis_writes.labels("stored").inc(report.writes_stored)
        self.redis_writes.labels("dropped").inc(report.writes_dropped)
        self.redis_errors.inc(report.redis_errors)
        self.redis_up.set(1 if report.redis_up else 0)

    def record_spill_dropped(self) -> None:
        self.spills_dropped.inc()

    def record_redis_write_dropped(self) -> None:
        self.redis_writes.labels("dropped").inc()

    def record_prefetch_timeout(self) -> None:
        self.prefetch_timeouts.inc()

    def record_estimates(self, cost: RestoreCostModel) -> None:
        for path, ema in cost.bandwidth.items():
            self.bandwidth.labels(path).set(ema.value)
        self.prefill_rate.set(1.0 / cost.prefill.coefficients[1])
        self.redis_overhead.set(cost.redis_fetch.coefficients[0])
