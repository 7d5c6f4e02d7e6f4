"""Prometheus metrics of the HTTP API: `longctx_` prefix, base units (seconds, tokens, blocks).

Request-level series (counts, tokens, TTFT, inter-token latency) are measured in the ingress,
where the client's view of latency is. Engine state (running, waiting, queued tokens, KV
blocks) belongs to the LLM server replicas; the ingress asks every replica for it when
scraped and exports it labelled by replica, so a replica that is gone leaves no stale series.
The same goes for the series a replica keeps in its own registry (the KV tiers,
kvcache/tier_metrics.py): each replica sends its exposition text, re-emitted here with a
`replica` label, so one scrape target covers every replica and Prometheus needs no access to
the Ray workers.
Each ingress owns its registry: no process-wide state, two apps in one process do not clash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

# Seconds: a CPU decode step takes milliseconds, a 1M-token prefill minutes (tens of minutes
# queued behind others), up to serve.request_timeout_s (3600 by default) and beyond when raised:
# the top buckets keep histogram_quantile exact there instead of pinned at the last bound.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)

# stats() key of an LLM server replica -> (gauge name, help)
REPLICA_GAUGES = {
    "num_running": ("longctx_requests_running", "Sequences in the running batch."),
    "num_waiting": ("longctx_requests_waiting", "Sequences waiting in the scheduler."),
    "num_queued_tokens": ("longctx_queued_tokens", "Prompt tokens not yet computed over waiting sequences."),
    "queued_requests": ("longctx_admission_queued_requests", "Admitted requests not yet streaming."),
    "queued_prompt_tokens": ("longctx_admission_queued_tokens", "Prompt tokens of admitted requests not yet streaming."),
    "num_running_kv_tokens": ("longctx_running_kv_tokens", "KV tokens held by running sequences."),
    "num_free_kv_blocks": ("longctx_kv_blocks_free", "Free device KV blocks."),
    "num_total_kv_blocks": ("longctx_kv_blocks_capacity", "Device KV blocks."),
}


class _ReplicaStatsCollector:
    """Gauges from the replicas' last reported stats, set just before each scrape."""

    def __init__(self) -> None:
        self.replica_stats: list[dict[str, Any]] = []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for key, (name, documentation) in REPLICA_GAUGES.items():
            family = GaugeMetricFamily(name, documentation, labels=["replica"])
            for stats in self.replica_stats:
                family.add_metric([str(stats["replica"])], float(stats.get(key, 0)))
            yield family


class _ReplicaRegistriesCollector:
    """The replicas' own series, from the exposition text each sent, with a `replica` label added.

    Families are merged by name across replicas, so HELP and TYPE appear once per family; the
    parser keeps counters' `_total` sample names, so the names in /metrics are the replica's own.
    """

    def __init__(self) -> None:
        self.expositions: list[tuple[str, str]] = []  # (replica, exposition text)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for replica, text in self.expositions:
            for family in _parse_families(replica, text):
                target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value, sample.timestamp)
        return merged.values()


def _parse_families(replica: str, text: str) -> list[Metric]:
    """One replica's families; text that does not parse costs that replica's series, not the scrape."""
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        logger.warning("replica %s sent metrics that do not parse; its own series are left out", replica)
        return []


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("longctx_requests", "Finished HTTP requests.", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("longctx_prompt_tokens", "Prompt tokens of served requests.", registry=self.registry)
        self.generation_tokens = Counter("longctx_generation_tokens", "Generated tokens.", registry=self.registry)
        self.prefix_hit_tokens = Counter(
            "longctx_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", registry=self.registry
        )
        self.ttft = Histogram("longctx_time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("longctx_inter_token_latency_seconds", "Between tokens of a sequence.", buckets=ITL_BUCKETS, registry=self.registry)
        self.duration = Histogram("longctx_request_duration_seconds", "Arrival to last token.", buckets=DURATION_BUCKETS, registry=self.registry)
        self._replicas = _ReplicaStatsCollector()
        self.registry.register(self._replicas)
        self._replica_registries = _ReplicaRegistriesCollector()
        self.registry.register(self._replica_registries)

    def exposition(self, snapshots: list[dict[str, Any]]) -> bytes:
        """This ingress's series plus the replicas': `snapshots` are their `metrics_snapshot()`s."""
        self._replicas.replica_stats = snapshots
        self._replica_registries.expositions = [
            (str(snapshot["replica"]), snapshot["exposition"]) for snapshot in snapshots if "exposition" in snapshot
        ]
        return generate_latest(self.registry)
