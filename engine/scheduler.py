"""Continuous batching with chunked prefill under a per-step token budget. No tensors.

Each step spends at most `max_tokens_per_step` tokens (`max_tokens_per_step_while_decoding` when
any request is decoding, so a prefill chunk delays others' next token by one short step), in this order:
  1. one token for every running request that is decoding (decodes never wait behind a prefill),
  2. the next prefill chunk of running requests whose prompt is not computed yet (while a shorter
     request waits to be admitted, these chunks take at most `prefill_share_while_waiting` of the
     budget),
  3. new requests from the waiting queue, FCFS, after a prefix-cache lookup.
So a 1M-token prompt advances by one budget-sized chunk per step while every other request keeps
producing a token per step. When the KV cache runs out of blocks, the most recently arrived
running request is preempted: its blocks are freed and it goes back to the head of the queue to
be recomputed (its full blocks usually survive in the prefix cache, so recompute is cheap).
A request whose cached prefix is fetched from Redis while it computes the first part itself
(kvcache/tiers/prefetch.py) pauses at the end of that part: it goes back to the head of the
queue, where its next lookup finds that part on the device and the fetched rest in host memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.config import SchedulerSettings
from engine.backlog import expected_hit_tokens
from engine.request import Request, RequestStatus
from kvcache.coordinator import KVCacheCoordinator, PrefixHit
from protocol.step import (
    CachedRequestData,
    NewRequestData,
    SampledToken,
    StepInput,
    StepOutput,
)


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the HTTP layer answers 429."""


@dataclass
class _StepPlan:
    """What one schedule() call decided, before it is frozen into a StepInput."""

    budget: int
    prefill_room: int  # tokens the running prefills may still take this step (decodes are not counted)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    preempted_any: bool = False


class Scheduler:
    def __init__(self, settings: SchedulerSettings, kv_cache: KVCacheCoordinator):
        self.settings = settings
        # Device blocks, prefix cache and the tiers below: the scheduler sees only the coordinator.
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # arrival order: the last one is preempted first
        self.requests: dict[str, Request] = {}
        self._dropped_request_ids: set[str] = set()  # workers must forget these next step
        self._paused_request_ids: set[str] = set()  # workers forget these too; the KV tiers do not
        self._step_id = 0
        self.num_preemptions_total = 0
        # The queue's head found no free blocks last step: sharing the budget with it would only
        # slow the running prefills down, so they take it all until admission moves again.
        self._admission_blocked = False

    # --- queue ---------------------------------------------------------------------------
    def check_room(self, num_requests: int) -> None:
        """QueueFullError unless `num_requests` more fit the waiting queue (a group, checked whole)."""
        if len(self.waiting) + num_requests > self.settings.max_waiting_requests:
            raise QueueFullError(
                f"waiting queue full ({len(self.waiting)} of {self.settings.max_waiting_requests} requests; "
                f"{num_requests} more asked)")

    def add_request(self, request: Request) -> None:
        self.check_room(1)
        pending = [*self.waiting, *self.running]
        request.num_expected_hit_tokens = expected_hit_tokens(request, self.kv_cache.device, pending)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Stop a request (finished or aborted) and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request_id)
        self._dropped_request_ids.add(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_queued_tokens(self) -> int:
        return sum(request.num_uncomputed_tokens for request in self.waiting)

    # --- scheduling ----------------------------------------------------------------------
    def schedule(self) -> StepInput:
        decoding, prefilling = [], []
        for request in self.running:
            (decoding if request.num_uncomputed_tokens == 1 else prefilling).append(request)
        budget = self.settings.max_tokens_per_step
        if decoding:
            budget = min(budget, self.settings.max_tokens_per_step_while_decoding)
        plan = _StepPlan(budget=budget, prefill_room=self._prefill_room(budget))
        for request in decoding + prefilling:
            if plan.budget == 0:
                break
            if request.status is RequestStatus.RUNNING:  # not preempted earlier in this loop
                self._schedule_running(request, plan)
        if not plan.preempted_any:
            self._admit_waiting(plan)
        return self._freeze(plan)

    def _prefill_room(self, budget: int) -> int:
        """The running prefills' share of `budget`: all of it unless the queue's head could be
        admitted and has less to compute than a running prompt has left (shortest remaining work
        first: a short request does not wait for a long prompt; equal ones keep their order,
        which gives the lowest mean time to first token)."""
        if not self.waiting or self._admission_blocked or len(self.running) >= self.settings.max_num_seqs:
            return budget
        longest_left = max((r.num_uncomputed_tokens for r in self.running if r.num_uncomputed_tokens > 1), default=0)
        if self.waiting[0].num_uncomputed_tokens >= longest_left:
            return budget
        return max(1, int(budget * self.settings.prefill_share_while_waiting))

    def _schedule_running(self, request: Request, plan: _StepPlan) -> None:
        num_uncomputed = request.num_uncomputed_tokens
        prefilling = num_uncomputed > 1
        if prefilling and plan.prefill_room == 0:
            return
        limit = plan.prefill_room if prefilling else plan.budget
        num_new = min(num_uncomputed, plan.budget, limit)
        if request.pause_at_tokens is not None:
            num_new = min(num_new, _tokens_before_pause(request))
        while True:
            new_blocks = self.kv_cache.allocate(request, request.num_computed_tokens + num_new)
            if new_blocks is not None:
                break
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return
        plan.num_scheduled_tokens[request.request_id] = num_new
        plan.cached_requests.append(CachedRequestData(
            request.request_id, tuple(map(tuple, new_blocks)), request.num_computed_tokens))
        plan.budget -= num_new
        if prefilling:
            plan.prefill_room -= num_new

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        was_prefilling = request.num_uncomputed_tokens > 1  # before the requeue resets its progress
        self._requeue(request, self._dropped_request_ids)
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        plan.preempted_any = True
        if request.request_id in plan.num_scheduled_tokens:  # scheduled earlier this step: undo
            num_new = plan.num_scheduled_tokens.pop(request.request_id)
            plan.budget += num_new
            if was_prefilling:
                plan.prefill_room += num_new
            plan.cached_requests = [c for c in plan.cached_requests if c.request_id != request.request_id]

    def _admit_waiting(self, plan: _StepPlan) -> None:
        """First come, first served, except that while the first request's prefix is on its way
        from Redis (seconds for a long document) the ones behind it may go first if they need
        nothing from Redis themselves; it keeps its place at the head. Only the first in line
        asks Redis: an answer given long before admission would be stale. A request that finds
        no free blocks stops admission (no overtaking for memory)."""
        fetching: Request | None = None
        self._admission_blocked = False
        while self.waiting and plan.budget > 0 and len(self.running) < self.settings.max_num_seqs:
            request = self.waiting.popleft()
            admitted = self._admit(request, plan, may_probe=fetching is None)
            if admitted is None and fetching is None:
                fetching = request
            elif not admitted:
                self.waiting.appendleft(request)
                self._admission_blocked = True
                break
        if fetching is not None:
            self.waiting.appendleft(fetching)

    def _admit(self, request: Request, plan: _StepPlan, may_probe: bool = True) -> bool | None:
        """Whether the request was admitted; None while it waits for Redis."""
        hit = self.kv_cache.miss(request) if request.computes_whole_prompt else self.kv_cache.lookup(request, may_probe)
        if hit is None:
            return None
        request.pause_at_tokens = hit.pause_at_tokens
        num_new = min(request.num_tokens - hit.num_tokens, plan.budget, _tokens_before_pause(request, hit.num_tokens))
        if self.kv_cache.allocate(request, hit.num_tokens + num_new, hit) is None:
            return False
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = hit.num_tokens
        if request.num_preemptions == 0:
            _record_hits(request, hit)
        self.running.append(request)
        plan.num_scheduled_tokens[request.request_id] = num_new
        plan.new_requests.append(self._new_request_data(request))
        plan.budget -= num_new
        return True

    def _new_request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=tuple(request.output_token_ids),
            sampling_params=request.sampling_params,
            block_ids=self.kv_cache.block_tables(request.request_id),
            num_computed_tokens=request.num_computed_tokens,
        )

    def _freeze(self, plan: _StepPlan) -> StepInput:
        self._step_id += 1
        dropped = frozenset(self._dropped_request_ids)
        paused = frozenset(self._paused_request_ids)
        self._dropped_request_ids.clear()
        self._paused_request_ids.clear()
        return StepInput(
            step_id=self._step_id,
            new_requests=tuple(plan.new_requests),
            cached_requests=tuple(plan.cached_requests),
            num_scheduled_tokens=plan.num_scheduled_tokens,
            finished_request_ids=dropped | paused,
            kv_transfers=self.kv_cache.take_transfers(dropped, idle=not plan.num_scheduled_tokens),
        )

    # --- after the step ------------------------------------------------------------------
    def update_from_output(self, step_input: StepInput, step_output: StepOutput) -> dict[str, SampledToken]:
        """Advance every scheduled request; return the tokens sampled for requests still alive."""
        sampled: dict[str, SampledToken] = {}
        for request_id, num_tokens in step_input.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            if request_id in step_output.failed:
                continue  # the engine ends it; none of this step's KV is cached
            request.num_computed_tokens += num_tokens
            self.kv_cache.on_tokens_computed(request)
            if request.num_computed_tokens == request.pause_at_tokens:
                self._pause(request)
                continue
            token = step_output.sampled.get(request_id)
            if token is not None:
                request.append_output_token(token.token_id)
                sampled[request_id] = token
        return sampled

    def _pause(self, request: Request) -> None:
        """The request computed up to its pause while the rest of its prefix came from Redis:
        back to the head of the queue, where its next lookup finds its blocks in the prefix cache
        and the rest in host memory (no preemption: nothing is lost). The tiers keep its prefetch."""
        self._requeue(request, self._paused_request_ids)
        request.resumed = True

    def _requeue(self, request: Request, forgotten: set[str]) -> None:
        """Back to the head of the queue, its blocks freed (full ones stay cached); the workers
        forget it next step (`forgotten`)."""
        self.running.remove(request)
        self.kv_cache.free(request.request_id)
        forgotten.add(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.pause_at_tokens = None
        self.waiting.appendleft(request)


def _tokens_before_pause(request: Request, computed: int | None = None) -> int:
    """Tokens the request may compute before its pause (no limit without one)."""
    if request.pause_at_tokens is None:
        return request.num_tokens
    return request.pause_at_tokens - (request.num_computed_tokens if computed is None else computed)


def _record_hits(request: Request, hit: PrefixHit) -> None:
    """What the caches served at admission; after a pause, what the second admission restored
    adds to the first's (the blocks computed before the pause are not hits)."""
    if request.resumed:
        request.num_prefix_hit_tokens += hit.restore.num_tokens
        request.num_host_hit_tokens += hit.host_tokens
        request.num_redis_hit_tokens += hit.redis_tokens
    else:
        request.num_prefix_hit_tokens = hit.num_tokens
        request.num_host_hit_tokens, request.num_redis_hit_tokens = hit.host_tokens, hit.redis_tokens
