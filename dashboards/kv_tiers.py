"""The KV tiers dashboard: blocks and bytes per tier, hit rates, spill / restore bandwidth, the
restore-or-recompute decisions and Redis health. Series: kvcache/tier_metrics.py, re-emitted by
the ingress with a `replica` label (deployments/metrics.py)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from dashboards.panels import Query, new_dashboard, rate, stat_panel, timeseries_panel

UID = "longctx-kv-tiers"


def kv_tiers_dashboard() -> dashboard.Dashboard:
    rows = [("Contents", _content_panels()), ("Hits and decisions", _hit_panels()), ("Transfers", _transfer_panels()),
            ("Redis", _redis_panels())]
    return new_dashboard(UID, "longctx / KV tiers", "Device, host and Redis KV tiers: contents, hits, transfers, "
                         "restore decisions, Redis health.", rows)


def _content_panels() -> list:
    return [
        timeseries_panel("KV blocks per tier", "Cached blocks findable by hash (device) and filled host slots.",
                         "short", [Query("sum by (tier) (longctx_kv_tier_blocks)", "{{tier}}")]),
        timeseries_panel("KV bytes per tier", "Bytes those blocks hold.", "bytes",
                         [Query("sum by (tier) (longctx_kv_tier_bytes)", "{{tier}}")]),
    ]


def _hit_panels() -> list:
    hits, misses = rate("longctx_kv_hit_tokens_total", by="tier"), rate("longctx_kv_miss_tokens_total", by="tier")
    return [
        timeseries_panel("Hit rate per tier", "Prompt tokens served from each tier over those looked up in it.",
                         "percentunit", [Query(f"{hits} / ({hits} + {misses})", "{{tier}}")]),
        timeseries_panel("Restore or recompute", "Decisions per second, by tier: restore cached blocks, or "
                         "recompute them because that was estimated faster.", "short",
                         [Query(rate("longctx_kv_restore_decisions_total", by="tier, decision"),
                                "{{tier}} {{decision}}")]),
    ]


def _transfer_panels() -> list:
    return [
        timeseries_panel("Spill and restore bandwidth", "Bytes per second moved between tiers, by path "
                         "(device_to_host: spills; host_to_device, redis_to_host: restores; host_to_redis: "
                         "write-back).", "Bps", [Query(rate("longctx_kv_transfer_bytes_total", by="path"), "{{path}}")]),
        timeseries_panel("Bandwidth estimates", "What the restore decisions assume per path (EMA of measured "
                         "transfers), per replica.", "Bps",
                         [Query("longctx_kv_bandwidth_estimate_bytes_per_second", "{{path}} {{replica}}")]),
    ]


def _redis_panels() -> list:
    return [
        stat_panel("Redis up", "1 while every Redis shard answers every replica.", "none",
                   [Query("min(longctx_kv_redis_up)", "up")]),
        timeseries_panel("Redis fetches and writes", "Blocks fetched per second by outcome, blocks written by "
                         "result (dropped: the write queue was full).", "short",
                         [Query(rate("longctx_kv_redis_fetches_total", by="outcome"), "fetch {{outcome}}"),
                          Query(rate("longctx_kv_redis_writes_total", by="result"), "write {{result}}")], width=9),
        timeseries_panel("Redis errors", "Failed Redis calls, prefetches given up, and values failing verification "
                         "(recomputed), per second.", "short",
                         [Query(rate("longctx_kv_redis_errors_total"), "errors"),
                          Query(rate("longctx_kv_prefetch_timeouts_total"), "prefetch timeouts"),
                          Query(rate("longctx_kv_checksum_failures_total"), "failed verification")], width=9),
    ]
