"""Which replica a prompt goes to: the router's cost, with a lane kept free of long prompts.

The router's cost of a replica is the prompt tokens queued there plus the ones this prompt would
compute there (deployments/routing_policy.py): a short request goes where it starts soonest.
A long prompt is different in two ways:
  - it has slack: its own prefill takes seconds to minutes, so waiting behind queued prompt
    tokens no more than its own uncached tokens at most doubles its time to first token
    (prefill time grows at least linearly in tokens, so W queued tokens take at most as long as
    the prompt's own U >= W);
  - it blocks: a replica prefills in arrival order, so every short request routed behind it
    waits for all of it, and a replica added by the autoscaler serves only what is routed after
    it is up (30 s or more later).
So a long prompt first joins a replica already busy with long prompts when the wait there fits
that slack, and takes a free replica (a lane) only while more than `short_lanes` of them are
left. Busy replicas are those with `long_prompt_tokens` or more queued. Plain Python: the router
(deployments/routing_policy.py) and the simulator (autoscaler/simulator/) rank with this one rule.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LaneRule:
    long_prompt_tokens: int  # a prompt computing this many tokens or more is long; so is a queue this deep
    short_lanes: int  # replicas free of long prompts that a long prompt does not take


@dataclass(frozen=True)
class Candidate:
    replica: Hashable
    queued_tokens: int  # prompt tokens admitted there and not yet streaming
    uncached_tokens: int  # prompt tokens this request would compute there
    tie_break: tuple = ()  # then fewer running KV tokens, then at random (the caller's order)

    @property
    def cost(self) -> tuple:
        return (self.queued_tokens + self.uncached_tokens, *self.tie_break)


def rank_replicas(candidates: Sequence[Candidate], rule: LaneRule) -> list[Hashable]:
    """Replicas, best first (Serve probes them in order and skips a full one)."""
    by_cost = sorted(candidates, key=lambda candidate: candidate.cost)
    if not by_cost or min(candidate.uncached_tokens for candidate in by_cost) < rule.long_prompt_tokens:
        return [candidate.replica for candidate in by_cost]  # short, or short where its prefix is cached
    lanes = [c for c in by_cost if c.queued_tokens < rule.long_prompt_tokens]
    busy = [c for c in by_cost if c.queued_tokens >= rule.long_prompt_tokens]
    within_slack = [c for c in busy if c.queued_tokens <= c.uncached_tokens]
    beyond_slack = [c for c in busy if c.queued_tokens > c.uncached_tokens]
    if len(lanes) > rule.short_lanes:
        order = within_slack + lanes + beyond_slack
    else:  # the last lanes stay free for short requests unless nothing else is left
        order = within_slack + beyond_slack + lanes
    return [candidate.replica for candidate in order]
