"""The queued-context policy on Ray Serve's custom autoscaling interface (Ray 2.60).

deployments/app.py sets `AutoscalingConfig(policy=AutoscalingPolicy(policy_function=
QueuedContextPolicy, policy_kwargs=<the autoscaling settings>))`. Serve's controller builds the
class once with those kwargs and calls it with an `AutoscalingContext` on every control-loop
tick (10 a second); it returns (replicas, policy state). Serve then clamps the count to its
(capacity-adjusted) min and max; its own up/down delays are 0, the policy has its own.

Each replica's stats arrive as time series of the floats `LLMServer.record_autoscaling_stats`
returns, one point per push; the policy reads the newest point of each, not Serve's average
over the look-back window, which would blur a burst.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from autoscaler.policy import PolicyState, decide
from autoscaler.signal import METRIC_KEYS, ClusterSignal, ReplicaSignal
from cluster.config import AutoscalingSettings

logger = logging.getLogger("ray.serve")


class QueuedContextPolicy:
    def __init__(self, **settings: Any):
        self.settings = AutoscalingSettings.model_validate(settings)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """`ctx`: ray.serve.config.AutoscalingContext."""
        signal = signal_from_context(ctx)
        now = ctx.current_time if ctx.current_time is not None else time.time()
        bounds = (ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        decision = decide(signal, PolicyState.from_dict(ctx.policy_state), self.settings, now, bounds)
        if decision.num_replicas != signal.num_target:
            logger.info("longctx autoscaler: %d -> %d replicas, %s", signal.num_target, decision.num_replicas,
                        decision.reason)
        return decision.num_replicas, decision.state.to_dict()


def signal_from_context(ctx: Any) -> ClusterSignal:
    latest = _latest_values(ctx.raw_metrics or {})
    averaged = ctx.aggregated_metrics or {}
    replicas = []
    for replica_id in ctx.running_replicas:
        metrics = {key: averaged[key][replica_id] for key in METRIC_KEYS if replica_id in averaged.get(key, {})}
        metrics.update(latest.get(replica_id, {}))
        replicas.append(ReplicaSignal.from_metrics(metrics))
    return ClusterSignal(tuple(replicas), ctx.target_num_replicas)


def _latest_values(raw_metrics: dict) -> dict[Any, dict[str, float]]:
    """replica -> {key: newest value} over the keys the policy reads."""
    latest: dict[Any, dict[str, float]] = {}
    for key in METRIC_KEYS:
        for replica_id, series in raw_metrics.get(key, {}).items():
            if series:
                newest = max(series, key=lambda point: point.timestamp)
                latest.setdefault(replica_id, {})[key] = newest.value
    return latest
