"""Ray Serve's default policy, the baseline: replicas = ongoing requests / target per replica.

The same arithmetic as ray.serve.autoscaling_policy's `replica_queue_length_autoscaling_policy`
with its delay logic: a change is made once the wish to move in one direction has lasted the
up- or down-scale delay, and then to the latest wish. Plain Python, so the simulator runs it
without Ray; it reads the newest counts rather than Serve's look-back average, which only
helps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OngoingRequestsSettings:
    target_ongoing_requests: float
    min_replicas: int
    max_replicas: int
    upscale_delay_s: float
    downscale_delay_s: float


@dataclass(frozen=True)
class DelayState:
    direction: int = 0  # +1: wants more replicas, -1: fewer, 0: content
    since: float | None = None  # when it started wanting that


def decide_ongoing(
    ongoing_requests: float, target_replicas: int, state: DelayState, settings: OngoingRequestsSettings, now: float
) -> tuple[int, DelayState]:
    wanted = math.ceil(ongoing_requests / settings.target_ongoing_requests - 1e-9)
    wanted = min(max(wanted, settings.min_replicas), settings.max_replicas)
    direction = (wanted > target_replicas) - (wanted < target_replicas)
    if direction == 0:
        return target_replicas, DelayState()
    since = state.since if state.direction == direction and state.since is not None else now
    delay = settings.upscale_delay_s if direction > 0 else settings.downscale_delay_s
    if now - since >= delay:
        return wanted, DelayState()
    return target_replicas, DelayState(direction, since)
