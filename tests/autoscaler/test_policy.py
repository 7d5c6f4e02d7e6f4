"""The queued-context policy as pure functions: exact replica counts for given loads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.capacity import required_replicas
from autoscaler.policy import PolicyState, decide
from autoscaler.signal import ClusterSignal, ReplicaSignal
from cluster.config import AutoscalingSettings, ConfigError, load_config_dict

SETTINGS = AutoscalingSettings(
    enabled=True, min_replicas=1, max_replicas=8, ttft_target_s=30, interactive_ttft_s=2, spare_replicas=1,
    downscale_delay_s=120, replica_startup_s=60, long_request_tokens=100_000,
)
IDLE = ReplicaSignal(kv_capacity_tokens=1_000_000)


def replica(**fields) -> ReplicaSignal:
    return ReplicaSignal(**{"kv_capacity_tokens": 1_000_000, **fields})


def cluster(*replicas: ReplicaSignal, target: int | None = None) -> ClusterSignal:
    return ClusterSignal(tuple(replicas), len(replicas) if target is None else target)


def test_littles_law_sizes_the_queued_prefill_to_drain_within_the_ttft_target():
    # 100 s of queued prefill, 30 s target: ceil(100 / 30) = 4 replicas; the busy lanes need 2.
    need = required_replicas(cluster(replica(pending_prefill_s=100)), SETTINGS)
    assert (need.prefill, need.lanes, need.replicas, need.binding) == (4, 2, 4, "prefill")


def test_a_configured_rate_prices_queued_tokens_instead_of_the_replicas_estimate():
    settings = SETTINGS.model_copy(update={"prefill_tokens_per_s": 10_000.0})
    signal = cluster(replica(pending_prefill_tokens=1_000_000, pending_prefill_s=5.0))
    assert required_replicas(signal, settings).prefill == 4  # 100 s at 10K tokens/s, not 5 s


def test_a_replica_busy_with_a_long_prefill_gets_a_spare_lane_for_short_requests():
    # 10 s owed: Little's law is content with 1 replica, but short requests would wait behind it.
    need = required_replicas(cluster(replica(pending_prefill_s=10), IDLE), SETTINGS)
    assert (need.prefill, need.lanes, need.replicas, need.binding) == (1, 2, 2, "lanes")
    two_busy = cluster(replica(pending_prefill_s=10), replica(pending_prefill_s=3), IDLE)
    assert required_replicas(two_busy, SETTINGS).lanes == 3


def test_kv_and_decode_constraints():
    # 3.5M running KV tokens at 90% of 1M a replica: ceil(3.89) = 4.
    need = required_replicas(cluster(replica(running_kv_tokens=2_000_000), replica(running_kv_tokens=1_500_000)),
                             SETTINGS)
    assert (need.kv, need.replicas, need.binding) == (4, 4, "kv")
    need = required_replicas(cluster(replica(num_decoding=300)), SETTINGS)  # 128 a replica
    assert (need.decode, need.replicas) == (3, 3)


def test_an_idle_cluster_needs_no_replica_beyond_the_minimum():
    need = required_replicas(cluster(IDLE, IDLE), SETTINGS)
    assert need.replicas == 0
    assert decide(cluster(IDLE, target=0), PolicyState(), SETTINGS, now=0).num_replicas == 1


def test_scale_up_is_immediate_and_clamped_to_the_maximum():
    decision = decide(cluster(replica(pending_prefill_s=100)), PolicyState(), SETTINGS, now=0)
    assert (decision.num_replicas, decision.reason) == (4, "up (prefill)")
    decision = decide(cluster(replica(pending_prefill_s=1000)), PolicyState(), SETTINGS, now=0)
    assert decision.num_replicas == 8
    decision = decide(cluster(replica(pending_prefill_s=1000)), PolicyState(), SETTINGS, now=0, bounds=(1, 5))
    assert decision.num_replicas == 5  # Serve's capacity-adjusted bounds win


def test_replicas_still_starting_count_toward_the_target():
    # One replica reports, four are asked for: the same load does not ask for more.
    decision = decide(cluster(replica(pending_prefill_s=100), target=4), PolicyState(), SETTINGS, now=0)
    assert (decision.num_replicas, decision.reason) == (4, "steady")


def test_hysteresis_keeps_a_load_near_the_boundary_steady():
    # 55 s fits 2 replicas at the 30 s target, but not at 80% of it (24 s each): stay at 3.
    decision = decide(cluster(replica(pending_prefill_s=55), IDLE, IDLE), PolicyState(), SETTINGS, now=0)
    assert (decision.num_replicas, decision.reason) == (3, "steady")


def test_scale_down_waits_the_delay_then_goes_to_the_peak_need_of_the_wait():
    state = PolicyState()
    two_needed = cluster(replica(pending_prefill_s=40), IDLE, IDLE, IDLE)  # fits 2 at 24 s each
    one_needed = cluster(IDLE, IDLE, IDLE, IDLE)
    for now, signal in [(0, two_needed), (60, one_needed), (119, one_needed)]:
        decision = decide(signal, state, SETTINGS, now)
        assert (decision.num_replicas, decision.reason) == (4, "wait (downscale delay)")
        state = decision.state
    assert state == PolicyState(low_since=0, low_peak=2)
    decision = decide(one_needed, state, SETTINGS, now=120)
    assert (decision.num_replicas, decision.reason, decision.state) == (2, "down", PolicyState())


def test_a_load_back_up_during_the_wait_restarts_it():
    low = decide(cluster(IDLE, IDLE), PolicyState(), SETTINGS, now=0)
    assert low.state.low_since == 0
    back = decide(cluster(replica(pending_prefill_s=50), IDLE), low.state, SETTINGS, now=100)
    assert (back.num_replicas, back.state) == (2, PolicyState())
    again = decide(cluster(IDLE, IDLE), back.state, SETTINGS, now=110)
    assert again.state.low_since == 110
    assert decide(cluster(IDLE, IDLE), again.state, SETTINGS, now=229).num_replicas == 2
    assert decide(cluster(IDLE, IDLE), again.state, SETTINGS, now=230).num_replicas == 1


def test_the_delay_is_at_least_a_replica_start_up():
    settings = SETTINGS.model_copy(update={"replica_startup_s": 300.0})
    state = decide(cluster(IDLE, IDLE), PolicyState(), settings, now=0).state
    assert decide(cluster(IDLE, IDLE), state, settings, now=299).num_replicas == 2
    assert decide(cluster(IDLE, IDLE), state, settings, now=300).num_replicas == 1


def test_no_replica_goes_while_a_long_request_is_in_flight():
    holding = cluster(replica(longest_request_tokens=500_000, num_decoding=1), IDLE, IDLE)
    state = decide(holding, PolicyState(), SETTINGS, now=0).state
    decision = decide(holding, state, SETTINGS, now=1000)
    assert (decision.num_replicas, decision.reason) == (3, "hold (long request in flight)")
    # It finished long after the delay: down at once, to what the wait needed at most.
    decision = decide(cluster(IDLE, IDLE, IDLE), decision.state, SETTINGS, now=1001)
    assert (decision.num_replicas, decision.reason) == (1, "down")


def test_state_round_trips_through_serves_policy_state_dict():
    state = PolicyState(low_since=12.5, low_peak=3)
    assert PolicyState.from_dict({"unrelated": 1, **state.to_dict()}) == state
    assert PolicyState.from_dict({}) == PolicyState()


def test_settings_reject_inverted_bounds_and_unknown_keys():
    with pytest.raises(ConfigError, match="autoscaling"):
        load_config_dict({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="autoscaling.target_ongoing"):
        load_config_dict({"autoscaling": {"target_ongoing": 2}})
    assert SETTINGS.effective_downscale_delay_s == 120


replicas_strategy = st.builds(
    ReplicaSignal,
    pending_prefill_s=st.floats(0, 1e4),
    running_kv_tokens=st.floats(0, 2e6),
    kv_capacity_tokens=st.just(1e6),
    num_decoding=st.floats(0, 1000),
    longest_request_tokens=st.floats(0, 1e6),
)


@given(st.lists(replicas_strategy, max_size=10), st.integers(0, 12), st.floats(0, 1e4), st.floats(0, 1e4))
def test_decisions_stay_in_bounds_and_never_drop_replicas_under_a_long_request(replicas, target, since, now):
    signal = ClusterSignal(tuple(replicas), target)
    decision = decide(signal, PolicyState(min(since, now), 1), SETTINGS, now)
    assert 1 <= decision.num_replicas <= 8
    if signal.holds_long_request(SETTINGS.long_request_tokens):
        assert decision.num_replicas >= min(max(target, 1), 8)
