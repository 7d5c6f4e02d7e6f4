"""The queued-context policy: a pure function from (signal, state, now) to a replica count.

  up     at once, to what the load needs (autoscaler/capacity.py): a queued 1M-token prompt
         waits for a new replica's start-up already; a delay on top only adds to it. Replicas
         still starting count toward the target, so a scale-up is not repeated while they start.
  down   only when the load fits fewer replicas with `downscale_headroom` to spare (hysteresis),
         and has for `effective_downscale_delay_s` (at least a replica's start-up time: release
         a replica only after idling as long as a new one would take to start, the ski-rental
         rule, which never pays more than twice the best choice in hindsight). Then to the
         most replicas the load needed during that wait, not to its last value.
  hold   no downscale while any replica holds a long request: Serve picks which replica stops
         (the newest, on the emptiest node), and a long request may outlast the drain timeout.
         Once it finishes its KV stays in Redis for the others.

Serve's own delays are set to 0 (deployments/app.py): they would delay scale-ups too. The state
is two numbers that live in Serve's `policy_state` between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoscaler.capacity import required_replicas
from autoscaler.signal import ClusterSignal
from cluster.config import AutoscalingSettings

_LOW_SINCE, _LOW_PEAK = "longctx_low_since", "longctx_low_peak"


@dataclass(frozen=True)
class PolicyState:
    low_since: float | None = None  # when the load first fitted fewer replicas than the target
    low_peak: int = 0  # the most replicas it needed since then

    def to_dict(self) -> dict[str, float | int | None]:
        return {_LOW_SINCE: self.low_since, _LOW_PEAK: self.low_peak}

    @classmethod
    def from_dict(cls, data: dict) -> PolicyState:
        return cls(data.get(_LOW_SINCE), int(data.get(_LOW_PEAK) or 0))

    def still_low(self, now: float, need: int) -> PolicyState:
        if self.low_since is None:
            return PolicyState(now, need)
        return PolicyState(self.low_since, max(self.low_peak, need))


@dataclass(frozen=True)
class Decision:
    num_replicas: int
    state: PolicyState
    reason: str  # for logs and the simulator's event list


def decide(
    signal: ClusterSignal, state: PolicyState, settings: AutoscalingSettings, now: float,
    bounds: tuple[int, int] | None = None,
) -> Decision:
    """`bounds`: (min, max) replicas; default the settings' (Serve passes them adjusted to the
    cluster's target capacity)."""
    low, high = bounds or (settings.min_replicas, settings.max_replicas)
    target = min(max(signal.num_target, low), high)
    need = required_replicas(signal, settings)
    wanted = min(max(need.replicas, low), high)
    if wanted > target:
        return Decision(wanted, PolicyState(), f"up ({need.binding})")
    fits = required_replicas(signal, settings, settings.downscale_headroom).replicas
    fits = min(max(fits, low), high)
    if fits >= target:
        return Decision(target, PolicyState(), "steady")
    state = state.still_low(now, fits)
    if signal.holds_long_request(settings.long_request_tokens):
        return Decision(target, state, "hold (long request in flight)")
    if now - state.low_since < settings.effective_downscale_delay_s:
        return Decision(target, state, "wait (downscale delay)")
    return Decision(state.low_peak, PolicyState(), "down")
