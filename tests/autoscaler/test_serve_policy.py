"""The Serve adapter under Serve's own wrapper (bounds, factors, delays), without starting Ray."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue  # noqa: E402
from ray.serve.autoscaling_policy import _apply_autoscaling_config  # noqa: E402
from ray.serve.config import AutoscalingContext  # noqa: E402

from autoscaler.serve_policy import QueuedContextPolicy, signal_from_context  # noqa: E402
from cluster.config import AutoscalingSettings  # noqa: E402
from deployments.app import autoscaling_config  # noqa: E402

SETTINGS = AutoscalingSettings(enabled=True, min_replicas=1, max_replicas=6, ttft_target_s=10,
                               downscale_delay_s=30, replica_startup_s=5)
DEPLOYMENT = DeploymentID(name="LLMServer", app_name="longctx")
REPLICAS = [ReplicaID(unique_id=name, deployment_id=DEPLOYMENT) for name in ("a", "b")]


def context(raw: dict, target: int, now: float, state: dict | None = None, aggregated: dict | None = None):
    config = autoscaling_config(SETTINGS)
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name="LLMServer", app_name="longctx",
        current_num_replicas=len(REPLICAS), target_num_replicas=target, running_replicas=REPLICAS,
        total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=aggregated or {}, raw_metrics=raw,
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None, current_time=now,
        config=config,
    )


def series(*points: tuple[float, float]) -> list[TimeStampedValue]:
    return [TimeStampedValue(timestamp, value) for timestamp, value in points]


def test_the_newest_reported_point_is_the_signal_not_the_window_average():
    raw = {"pending_prefill_s": {REPLICAS[0]: series((1.0, 0.0), (3.0, 45.0), (2.0, 5.0))}}
    aggregated = {"pending_prefill_s": {REPLICAS[0]: 16.7, REPLICAS[1]: 4.0}, "num_decoding": {REPLICAS[1]: 7.0}}
    signal = signal_from_context(context(raw, target=2, now=0, aggregated=aggregated))
    assert [r.pending_prefill_s for r in signal.replicas] == [45.0, 4.0]  # b: no raw points, the average
    assert [r.num_decoding for r in signal.replicas] == [0.0, 7.0]
    assert signal.num_target == 2


def test_serves_wrapper_passes_the_policys_fast_up_and_slow_down_through():
    policy = _apply_autoscaling_config(QueuedContextPolicy(**autoscaling_config(SETTINGS).policy.policy_kwargs))
    burst = {"pending_prefill_s": {REPLICAS[0]: series((0.0, 45.0))}}
    replicas, state = policy(context(burst, target=2, now=0))
    assert replicas == 5  # ceil(45 s / 10 s), at once: Serve's upscale delay is 0
    idle = {"pending_prefill_s": {REPLICAS[0]: series((1.0, 0.0))}}
    replicas, state = policy(context(idle, target=5, now=1, state=state))
    assert replicas == 5 and state["longctx_low_since"] == 1
    replicas, state = policy(context(idle, target=5, now=30, state=state))
    assert replicas == 5
    replicas, state = policy(context(idle, target=5, now=31, state=state))
    assert replicas == 1 and state["longctx_low_since"] is None


def test_serve_options_push_stats_every_second_and_leave_the_delays_to_the_policy():
    config = autoscaling_config(SETTINGS)
    assert (config.metrics_interval_s, config.look_back_period_s) == (1.0, 5.0)
    assert (config.upscale_delay_s, config.downscale_delay_s) == (0.0, 0.0)
    assert config.policy.policy_function == "autoscaler.serve_policy.QueuedContextPolicy"
    assert config.policy.get_policy()(**config.policy.policy_kwargs).settings == SETTINGS
