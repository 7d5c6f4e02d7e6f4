"""Scoring a simulated run: TTFT against the SLO, replica-seconds, scale events.

The default SLO scales with the prompt, since a 1M-token prefill alone takes minutes: a request
meets it when its TTFT is at most a fixed allowance plus twice its own prefill time on an idle
replica (no prefix hits). `fixed_ttft_s` replaces it with one bound for every request. A request
cut by a scale-down misses it, whatever its TTFT was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autoscaler.simulator.hardware import ReplicaHardware
from autoscaler.simulator.replica import Job
from autoscaler.simulator.simulation import SimulationRun
from autoscaler.simulator.trace import TraceRequest

LONG_PROMPT_TOKENS = 32_768  # the short / long split of the per-class attainment


@dataclass(frozen=True)
class SloRule:
    allowance_s: float = 3.0
    fixed_ttft_s: float | None = None

    def bound_s(self, request: TraceRequest, hardware: ReplicaHardware) -> float:
        if self.fixed_ttft_s is not None:
            return self.fixed_ttft_s
        return self.allowance_s + 2.0 * hardware.prefill_seconds(0, request.input_length)

    def describe(self) -> str:
        if self.fixed_ttft_s is not None:
            return f"ttft <= {self.fixed_ttft_s:g} s"
        return f"ttft <= {self.allowance_s:g} s + 2 x own prefill on an idle replica"


def ttft_s(job: Job) -> float | None:
    return None if job.first_token_s is None else job.first_token_s - job.request.arrival_s


def met_slo(job: Job, slo: SloRule, hardware: ReplicaHardware) -> bool:
    ttft = ttft_s(job)
    return not job.cut and ttft is not None and ttft <= slo.bound_s(job.request, hardware)


def summarize(run: SimulationRun, policy: str, slo: SloRule, hardware: ReplicaHardware) -> dict[str, Any]:
    jobs = run.jobs
    met = [met_slo(job, slo, hardware) for job in jobs]
    long = [job.request.input_length >= LONG_PROMPT_TOKENS for job in jobs]
    ttfts = sorted(t for t in (ttft_s(job) for job in jobs) if t is not None)
    replica_seconds = run.replica_seconds()
    return {
        "policy": policy,
        "slo": slo.describe(),
        "num_requests": len(jobs),
        "slo_attainment": _share(met),
        "short_slo_attainment": _share([m for m, is_long in zip(met, long) if not is_long]),
        "long_slo_attainment": _share([m for m, is_long in zip(met, long) if is_long]),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "replica_seconds": replica_seconds,
        "mean_replicas": replica_seconds / run.end_s if run.end_s > 0 else 0.0,
        "peak_replicas": max((point.target_replicas for point in run.timeline), default=0),
        "scale_events": len(run.scale_events),
        "cut_requests": sum(job.cut for job in jobs),
        "duration_s": run.end_s,
    }


def percentile(sorted_values: Sequence[float], rank: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None for none."""
    if not sorted_values:
        return None
    index = max(0, math.ceil(rank / 100.0 * len(sorted_values)) - 1)
    return sorted_values[index]


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None
