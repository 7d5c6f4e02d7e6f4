"""Which replica a prompt goes to: the router's cost, with a lane kept free of long prompts.

The router's cost of a replica is the prompt tokens queued there plus the ones this prompt would
compute there (deployments/routing_policy.py): a short request goes where it starts soonest.
A long prompt is different in two ways:
  - it has slack: its own prefill takes seconds to minutes, so waiting behind no more queued
    prompt tokens than its own length at most doubles its time to first token on an idle
    replica (prefill time grows at least linearly in tokens, so W queued tokens take at most as
    long as the prompt's own P >= W);
  - it blocks: a short request routed behind it waits for it (all of it when a replica
    prefills in arrival order; since session 9 the engine gives a shorter waiting request half
    of each step, which still halves the long prompt's pace and slows the short one), and a
    replica added by the autoscaler serves only what is routed after it is up (30 s or more later).
So a long prompt first goes where it leaves every free replica (a lane) free: a replica already
busy with long prompts, or one holding its prefix, when the wait there fits that slack; it
takes a lane (makes it busy) only while more than `short_lanes` of them are left. Busy replicas
are those with `long_prompt_tokens` or more queued. Plain Python: the router
(deployments/routing_policy.py) and the simulator (autoscaler/simulator/) rank with this one rule.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LaneRule:
    long_prompt_tokens: int  # a prompt this long is long; a replica queueing this many tokens is busy
    short_lanes: int  # replicas free of long prompts that a long prompt does not take


@dataclass(frozen=True)
class Candidate:
    replica: Hashable
    queued_tokens: int  # prompt tokens queued there (what a new prompt waits behind)
    uncached_tokens: int  # prompt tokens this request would compute there
    tie_break: tuple = ()  # then fewer running KV tokens, then at random (the caller's order)

    @property
    def cost(self) -> tuple:
        """The wait plus its own compute; equal ones go where it computes less (less work in all)."""
        return (self.queued_tokens + self.uncached_tokens, self.uncached_tokens, *self.tie_break)


def rank_replicas(candidates: Sequence[Candidate], prompt_tokens: int, rule: LaneRule) -> list[Hashable]:
    """Replicas, best first (Serve probes them in order and skips a full one)."""
    by_cost = sorted(candidates, key=lambda candidate: candidate.cost)
    if prompt_tokens < rule.long_prompt_tokens:
        return [candidate.replica for candidate in by_cost]
    lanes = [c for c in by_cost if c.queued_tokens < rule.long_prompt_tokens]
    taken = [c for c in lanes if c.queued_tokens + c.uncached_tokens >= rule.long_prompt_tokens]
    keeps = [c for c in by_cost if c not in taken]  # busy already, or its prefix is cached there
    within_slack = [c for c in keeps if c.queued_tokens <= prompt_tokens]
    beyond_slack = [c for c in keeps if c.queued_tokens > prompt_tokens]
    if len(lanes) > rule.short_lanes:
        order = within_slack + taken + beyond_slack
    else:  # the last lanes stay free for short requests unless nothing else is left
        order = within_slack + beyond_slack + taken
    return [candidate.replica for candidate in order]
