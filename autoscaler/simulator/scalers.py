"""The two policies the simulator compares, behind one small interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from autoscaler.ongoing_requests import DelayState, OngoingRequestsSettings, decide_ongoing
from autoscaler.policy import PolicyState, decide
from autoscaler.signal import ClusterSignal
from cluster.config import AutoscalingSettings

POLICIES = ("queued-context", "ongoing-requests")


@dataclass(frozen=True)
class ClusterView:
    """What Serve's controller knows at a metrics push."""

    signal: ClusterSignal  # the routable replicas' reports; num_target counts starting ones too
    ongoing_requests: int  # in the replicas and queued at the handles


class Scaler(Protocol):
    def decide(self, view: ClusterView, now: float) -> int: ...


class QueuedContextScaler:
    def __init__(self, settings: AutoscalingSettings):
        self.settings = settings
        self.state = PolicyState()

    def decide(self, view: ClusterView, now: float) -> int:
        decision = decide(view.signal, self.state, self.settings, now)
        self.state = decision.state
        return decision.num_replicas


class OngoingRequestsScaler:
    """Serve's default, given the same bounds and delays as the queued-context policy (up at
    once, down after the same wait), so that only the signal differs."""

    def __init__(self, settings: AutoscalingSettings, target_ongoing_requests: float):
        self.settings = OngoingRequestsSettings(
            target_ongoing_requests, settings.min_replicas, settings.max_replicas,
            upscale_delay_s=0.0, downscale_delay_s=settings.effective_downscale_delay_s,
        )
        self.state = DelayState()

    def decide(self, view: ClusterView, now: float) -> int:
        replicas, self.state = decide_ongoing(view.ongoing_requests, view.signal.num_target, self.state,
                                              self.settings, now)
        return replicas


def make_scaler(policy: str, settings: AutoscalingSettings, target_ongoing_requests: float = 2.0) -> Scaler:
    if policy == "queued-context":
        return QueuedContextScaler(settings)
    if policy == "ongoing-requests":
        return OngoingRequestsScaler(settings, target_ongoing_requests)
    raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
