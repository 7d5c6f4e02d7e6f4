"""One simulated replica: FCFS prefill, concurrent decodes, a prefix cache of Mooncake blocks.

Prefill runs one prompt at a time, in arrival order, as the engine's chunked prefill did until
session 9: a running prefill took each step's token budget before a waiting request was
admitted, so a short request queued behind a 1M-token prompt waited for all of it. The engine
now gives a shorter waiting request half of each step (engine/scheduler.py); this model keeps
the worst case for short requests, which is what the lane rule guards against. Decodes run beside it. A
prompt starts only when its whole KV (prompt + output) fits; it then holds it until its last
token. Prefix hits are found when a prefill starts: leading blocks in this replica's cache are
free, those in the shared Redis tier cost their restore time.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

from autoscaler.lanes import Candidate
from autoscaler.signal import ReplicaSignal
from autoscaler.simulator.hardware import ReplicaHardware
from autoscaler.simulator.trace import BLOCK_TOKENS, TraceRequest


@dataclass
class Job:
    index: int
    request: TraceRequest
    first_token_s: float | None = None  # simulated time of the first token
    done_s: float | None = None
    cut: bool = False  # its replica stopped before it finished
    blocks: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = frozenset(self.request.hash_ids)

    @property
    def kv_tokens(self) -> int:
        return self.request.input_length + self.request.output_length


class SimReplica:
    def __init__(self, replica_id: int, hardware: ReplicaHardware, requested_s: float, ready_s: float,
                 redis: set[int] | None):
        self.replica_id = replica_id
        self.hardware = hardware
        self.requested_s = requested_s
        self.ready_s = ready_s
        self.stopped_s: float | None = None
        self.drain_deadline_s: float | None = None  # set when Serve asks it to stop
        self.queue: deque[Job] = deque()
        self.prefilling: Job | None = None
        self.prefill_started_s = self.prefill_done_s = 0.0
        self.prefill_tokens = 0  # of the running prompt, net of its prefix hits
        self.decoding: dict[int, Job] = {}
        self.kv_used = 0
        self.cache: OrderedDict[int, None] = OrderedDict()  # block id -> None, least recent first
        self.redis = redis

    # --- state ---------------------------------------------------------------------------
    def is_routable(self, now: float) -> bool:
        return self.ready_s <= now and self.drain_deadline_s is None and self.stopped_s is None

    def is_idle(self) -> bool:
        return not self.queue and self.prefilling is None and not self.decoding

    def jobs(self) -> list[Job]:
        return [*self.queue, *([self.prefilling] if self.prefilling else []), *self.decoding.values()]

    # --- prefill and decode --------------------------------------------------------------
    def start_prefill(self, now: float) -> float | None:
        """Start the next prompt if the replica is free for it: the time its first token is due."""
        if self.prefilling is not None or not self.queue or now < self.ready_s:
            return None
        job = self.queue[0]
        if self.kv_used + job.kv_tokens > self.hardware.kv_capacity_tokens and self.kv_used > 0:
            return None  # waits for decodes to free KV (a prompt that fits nowhere runs alone)
        self.queue.popleft()
        self.prefilling, self.kv_used = job, self.kv_used + job.kv_tokens
        hit_tokens, seconds = self._prefill_plan(job.request)
        self.prefill_tokens = job.request.input_length - hit_tokens
        self.prefill_started_s, self.prefill_done_s = now, now + seconds
        return self.prefill_done_s

    def finish_prefill(self, now: float) -> tuple[Job, float]:
        """The running prompt's first token: (its job, when its last token is due)."""
        job, self.prefilling = self.prefilling, None
        job.first_token_s = now
        self._remember(job.request.hash_ids)
        self.decoding[job.index] = job
        return job, now + job.request.output_length / self.hardware.decode_tokens_per_s

    def finish_decode(self, job: Job, now: float) -> None:
        del self.decoding[job.index]
        self.kv_used -= job.kv_tokens
        job.done_s = now

    def cut_everything(self) -> list[Job]:
        """The drain timeout passed: Serve kills the replica with these still in flight."""
        jobs = self.jobs()
        for job in jobs:
            job.cut = True
        self.queue.clear()
        self.prefilling, self.decoding, self.kv_used = None, {}, 0
        return jobs

    def _prefill_plan(self, request: TraceRequest) -> tuple[int, float]:
        """(prefix hit tokens, seconds to restore them and compute the rest)."""
        local = _hit_tokens(request, [self.cache])
        remote = max(local, _hit_tokens(request, [self.redis])) if self.redis else local
        seconds = self.hardware.restore_seconds(local, remote) + self.hardware.prefill_seconds(remote, request.input_length)
        return remote, seconds

    def _remember(self, hash_ids: tuple[int, ...]) -> None:
        for block in hash_ids:
            self.cache[block] = None
            self.cache.move_to_end(block)
        while len(self.cache) * BLOCK_TOKENS > self.hardware.kv_capacity_tokens:
            self.cache.popitem(last=False)
        if self.redis is not None:
            self.redis.update(hash_ids)

    # --- what the replica reports ------------------------------------------------------------
    def signal(self, now: float) -> ReplicaSignal:
        """As the engine reports it (engine/backlog.py): queued prompts net of the prefix they
        are expected to find, in tokens and in seconds."""
        tokens, seconds = 0, 0.0
        if self.prefilling is not None:
            seconds = max(0.0, self.prefill_done_s - now)
            left = seconds / max(1e-9, self.prefill_done_s - self.prefill_started_s)
            tokens = round(self.prefill_tokens * left)
        ahead = [self.prefilling.blocks] if self.prefilling else []
        for job in self.queue:
            start = _hit_tokens(job.request, [self.cache, *ahead])
            tokens += job.request.input_length - start
            seconds += self.hardware.prefill_seconds(start, job.request.input_length)
            ahead.append(job.blocks)
        return ReplicaSignal(
            pending_prefill_tokens=tokens, pending_prefill_s=seconds, running_kv_tokens=self.kv_used,
            kv_capacity_tokens=self.hardware.kv_capacity_tokens, num_decoding=len(self.decoding),
            longest_request_tokens=max((job.request.input_length for job in self.jobs()), default=0),
        )

    def routing_candidate(self, request: TraceRequest) -> Candidate:
        """What the router knows of this replica for `request` (deployments/routing_policy.py):
        prompt tokens queued here and the ones this request would compute here; ties to fewer
        running KV tokens, then the oldest replica."""
        admitted = [*self.queue, *([self.prefilling] if self.prefilling else [])]  # not yet streaming
        queued = sum(job.request.input_length for job in admitted)
        sent = [self.cache, *(job.blocks for job in admitted)]
        uncached = request.input_length - _hit_tokens(request, sent)
        return Candidate(self, queued, uncached, (self.kv_used, self.replica_id))


def _hit_tokens(request: TraceRequest, sources: Sequence[Container[int]]) -> int:
    """Leading prompt tokens whose blocks are all found, each in one of `sources` (a prefix is
    one chain: every leading block must be somewhere), short of the last prompt token."""
    count = 0
    for block in request.hash_ids:
        if not any(block in source for source in sources):
            break
        count += 1
    return min(count * BLOCK_TOKENS, request.input_length - 1)
