"""The event loop: arrivals, routing, prefill and decode completions, metrics pushes, scaling.

Serve's behaviour that decides the outcome is modelled as Serve has it:
  - the controller sees the replicas' stats once per metrics push and decides then;
  - a new replica serves `startup_s` after it is asked for; requests arriving while no replica
    can take them wait at the handle;
  - a downscale stops the newest replicas (those still starting first); a stopping replica
    takes no new request and finishes what it holds, for at most the drain timeout, after
    which whatever is left is cut;
  - the router sends each request where queued prompt tokens plus the tokens it would have
    to compute there are fewest, a long prompt first behind other long prompts when it can wait
    that long, leaving lanes for short requests (deployments/routing_policy.py, autoscaler/lanes.py).
Everything is deterministic: same trace, same settings, same result.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import count

from autoscaler.lanes import LaneRule, rank_replicas
from autoscaler.signal import ClusterSignal
from autoscaler.simulator.hardware import ReplicaHardware
from autoscaler.simulator.replica import Job, SimReplica
from autoscaler.simulator.scalers import ClusterView, Scaler
from autoscaler.simulator.trace import TraceRequest

ARRIVE, READY, PREFILLED, DECODED, DRAIN_DEADLINE, PUSH = range(6)


@dataclass(frozen=True)
class SimulationSettings:
    metrics_interval_s: float  # autoscaling.metrics_push_interval_s
    drain_timeout_s: float  # serve.drain_timeout_s: Serve's graceful shutdown timeout
    startup_s: float  # autoscaling.replica_startup_s
    initial_replicas: int  # serving at time 0
    lanes: LaneRule  # the router's rule for long prompts (serve.routing_*)


@dataclass(frozen=True)
class TimelinePoint:
    time_s: float
    target_replicas: int  # asked for (starting + serving)
    serving_replicas: int
    queued_prefill_tokens: float  # over the serving replicas, net of prefix hits


@dataclass
class SimulationRun:
    jobs: list[Job]
    replicas: list[SimReplica]
    timeline: list[TimelinePoint] = field(default_factory=list)
    scale_events: list[tuple[float, int, int]] = field(default_factory=list)  # (time, from, to)
    end_s: float = 0.0

    def replica_seconds(self) -> float:
        return sum(min(replica.stopped_s or self.end_s, self.end_s) - replica.requested_s for replica in self.replicas)


class Simulation:
    def __init__(self, trace: list[TraceRequest], scaler: Scaler, hardware: ReplicaHardware,
                 settings: SimulationSettings):
        self.scaler = scaler
        self.hardware = hardware
        self.settings = settings
        self.redis: set[int] | None = set() if hardware.redis_restore_tokens_per_s is not None else None
        self.run = SimulationRun(jobs=[Job(index, request) for index, request in enumerate(trace)], replicas=[])
        self.unrouted: list[Job] = []
        self.num_open = len(trace)
        self._events: list[tuple[float, int, int, object]] = []
        self._sequence = count()

    def simulate(self) -> SimulationRun:
        for _ in range(self.settings.initial_replicas):
            self._add_replica(0.0, ready_s=0.0)
        for job in self.run.jobs:
            self._at(job.request.arrival_s, ARRIVE, job)
        self._at(0.0, PUSH, None)
        handlers = {ARRIVE: self._arrive, READY: self._ready, PREFILLED: self._prefilled,
                    DECODED: self._decoded, DRAIN_DEADLINE: self._drain_deadline, PUSH: self._push}
        while self._events and self.num_open:
            now, _, kind, payload = heapq.heappop(self._events)
            handlers[kind](now, payload)
            self.run.end_s = now
        return self.run

    def _at(self, time_s: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (time_s, next(self._sequence), kind, payload))

    # --- requests ------------------------------------------------------------------------
    def _arrive(self, now: float, job: Job) -> None:
        self.unrouted.append(job)
        self._route_waiting(now)

    def _route_waiting(self, now: float) -> None:
        routable = [replica for replica in self.run.replicas if replica.is_routable(now)]
        if not routable:
            return
        for job in self.unrouted:
            candidates = [replica.routing_candidate(job.request) for replica in routable]
            replica = rank_replicas(candidates, job.request.input_length, self.settings.lanes)[0]
            replica.queue.append(job)
            self._advance(replica, now)
        self.unrouted = []

    def _advance(self, replica: SimReplica, now: float) -> None:
        """Start its next prefill if it can; stop it if it is draining and has nothing left."""
        done_s = replica.start_prefill(now)
        if done_s is not None:
            self._at(done_s, PREFILLED, (replica, done_s))
        if replica.drain_deadline_s is not None and replica.stopped_s is None and replica.is_idle():
            replica.stopped_s = now

    def _prefilled(self, now: float, payload: tuple[SimReplica, float]) -> None:
        replica, due_s = payload
        if replica.prefilling is None or replica.prefill_done_s != due_s:
            return  # cut meanwhile
        job, decoded_s = replica.finish_prefill(now)
        self._at(decoded_s, DECODED, (replica, job))
        self._advance(replica, now)

    def _decoded(self, now: float, payload: tuple[SimReplica, Job]) -> None:
        replica, job = payload
        if job.index not in replica.decoding:
            return
        replica.finish_decode(job, now)
        self.num_open -= 1
        self._advance(replica, now)

    # --- replicas ------------------------------------------------------------------------
    def _add_replica(self, now: float, ready_s: float | None = None) -> SimReplica:
        ready_s = now + self.settings.startup_s if ready_s is None else ready_s
        replica = SimReplica(len(self.run.replicas), self.hardware, now, ready_s, self.redis)
        self.run.replicas.append(replica)
        self._at(replica.ready_s, READY, replica)
        return replica

    def _ready(self, now: float, replica: SimReplica) -> None:
        if replica.stopped_s is None:
            self._route_waiting(now)

    def _stop(self, replica: SimReplica, now: float) -> None:
        if now < replica.ready_s:  # still starting: nothing to drain
            replica.stopped_s = now
            return
        replica.drain_deadline_s = now + self.settings.drain_timeout_s
        self._at(replica.drain_deadline_s, DRAIN_DEADLINE, replica)
        self._advance(replica, now)

    def _drain_deadline(self, now: float, replica: SimReplica) -> None:
        if replica.stopped_s is not None:
            return
        self.num_open -= len(replica.cut_everything())
        replica.stopped_s = now

    # --- autoscaling ---------------------------------------------------------------------
    def _active(self) -> list[SimReplica]:
        """Starting or serving, oldest first: what Serve counts toward the target."""
        return [r for r in self.run.replicas if r.stopped_s is None and r.drain_deadline_s is None]

    def _push(self, now: float, _: object) -> None:
        active = self._active()
        serving = [replica for replica in active if replica.ready_s <= now]
        signal = ClusterSignal(tuple(replica.signal(now) for replica in serving), len(active))
        ongoing = len(self.unrouted) + sum(len(replica.jobs()) for replica in serving)
        wanted = self.scaler.decide(ClusterView(signal, ongoing), now)
        if not serving and ongoing:  # Serve's cold start: requests waiting and none serving
            wanted = max(wanted, 1)
        if wanted != len(active):
            self.run.scale_events.append((now, len(active), wanted))
            self._resize(active, wanted, now)
        self.run.timeline.append(TimelinePoint(now, wanted, len(serving), signal.total("pending_prefill_tokens")))
        self._at(now + self.settings.metrics_interval_s, PUSH, None)

    def _resize(self, active: list[SimReplica], wanted: int, now: float) -> None:
        for _ in range(wanted - len(active)):
            self._add_replica(now)
        # Serve stops replicas still starting first, then the newest.
        by_priority = sorted(active, key=lambda replica: (replica.ready_s <= now, -replica.replica_id))
        for replica in by_priority[: max(0, len(active) - wanted)]:
            self._stop(replica, now)
