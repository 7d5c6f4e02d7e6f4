"""Which LLM server replica a request goes to. Plain Python: no Ray, tested exhaustively.

The router remembers which replica it sent each prompt prefix to, as chained hashes of
fixed-size token chunks (`kvcache.block_hash`: the name of chunk i covers the whole prefix up
to it, so matching chunk i means the replica saw that entire prefix). It then sends a request
where it costs least to serve:

    cost(replica) = queued prompt tokens on it + prompt tokens it would have to prefill

Equal queues: the replica holding the longest prefix wins. No prefix anywhere: the fewest
queued context tokens wins. A prefix holder buried under a backlog larger than what its cache
saves loses to an idle replica, which is the point: a cache hit is worth exactly the prefill it
saves. Ties go to the replica with fewer running KV tokens, then at random. A long prompt
first joins a replica already busy with long prompts when the wait there is at most its own
prefill, and leaves `short_lanes` replicas free for short requests (autoscaler/lanes.py).

Loads come from the replicas' `record_routing_stats` every period; the router adds the prompt
tokens it sent after a report was taken, so a burst does not all land on the replica that looked
idlest at the last report, and takes off those the report counted that have completed since.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from autoscaler.lanes import Candidate, LaneRule, rank_replicas
from kvcache.block_hash import hash_full_blocks, root_hash

ROUTER_FINGERPRINT = "longctx.deployments.router"  # router-only names, never compared with the engine's
MAX_COMPLETED_PER_REPLICA = 4096  # completions kept for reports still to come
MAX_IN_FLIGHT_PER_REPLICA = 65536  # routed requests whose completion has not come (a bound, not a limit)


@dataclass(frozen=True)
class ReplicaLoad:
    queued_prompt_tokens: int = 0
    running_kv_tokens: int = 0
    free_kv_blocks: int = 0
    reported_at: float = 0.0

    @classmethod
    def from_stats(cls, stats: dict | None) -> ReplicaLoad:
        stats = stats or {}
        return cls(**{name: stats[name] for name in cls.__dataclass_fields__ if name in stats})


def prefix_hashes(token_ids: Sequence[int], chunk_tokens: int, cache_salt: str | None) -> list[bytes]:
    """Names of the prompt's full chunks; tenants with different salts never match each other."""
    return hash_full_blocks(token_ids, chunk_tokens, root_hash(ROUTER_FINGERPRINT, cache_salt))


class PrefixAffinityTable:
    """Chunk name -> replicas that were sent that prefix, least recently used evicted first."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._holders: OrderedDict[bytes, dict[str, None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, replica: str, hashes: Sequence[bytes]) -> None:
        for name in hashes:
            holders = self._holders.get(name)
            if holders is None:
                holders = self._holders[name] = {}
            else:
                self._holders.move_to_end(name)
            holders[replica] = None
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)

    def matched_chunks(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """For each replica holding the first chunk, how many leading chunks it holds."""
        depth: dict[str, int] = {}
        active: set[str] | None = None
        for index, name in enumerate(hashes):
            holders = self._holders.get(name)
            active = set(holders or ()) if active is None else active.intersection(holders or ())
            if not active:
                break
            for replica in active:
                depth[replica] = index + 1
        return depth

    def forget(self, replica: str) -> None:
        for holders in self._holders.values():
            holders.pop(replica, None)


@dataclass
class ReplicaLedger:
    """What the router knows of one replica's queue between two of its reports.

    A report is a snapshot taken at `reported_at` (the replica's clock; replicas and routers
    share hosts or NTP). The router corrects it with what it saw since, by time, not by order of
    arrival: Serve may deliver a report after a request it counted has already completed.
    """

    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    ranked: dict[str, int] = field(default_factory=dict)  # request -> uncached tokens, not yet routed
    in_flight: dict[str, tuple[int, float]] = field(default_factory=dict)  # request -> (tokens, sent at)
    completed: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens, sent at, completed at)

    def update(self, load: ReplicaLoad) -> None:
        if load.reported_at < self.load.reported_at:
            return  # an older snapshot delivered late
        self.load = load
        # A request completed before this snapshot is in neither it nor any later one.
        self.completed = [entry for entry in self.completed if entry[2] > load.reported_at]

    def queued_tokens(self) -> int:
        """The report, less what it counted and has completed since, plus what was sent after it."""
        taken = self.load.reported_at
        finished = sum(tokens for tokens, sent, done in self.completed if sent <= taken < done)
        sent_since = sum(tokens for tokens, sent in self.in_flight.values() if sent > taken)
        return max(0, self.load.queued_prompt_tokens - finished) + sent_since + sum(self.ranked.values())

    def complete(self, request: str, now: float) -> None:
        tokens, sent_at = self.in_flight.pop(request, (0, now))
        if tokens:
            self.completed.append((tokens, sent_at, now))
            del self.completed[:-MAX_COMPLETED_PER_REPLICA]  # a replica whose reports stopped


class PrefixAwarePolicy:
    def __init__(self, chunk_tokens: int, max_entries: int, lanes: LaneRule, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time):
        self.chunk_tokens = chunk_tokens
        self.lanes = lanes
        self.table = PrefixAffinityTable(max_entries)
        self.rng = rng or random.Random()
        self.clock = clock  # wall time, comparable with the replicas' `reported_at`
        self._ledgers: dict[str, ReplicaLedger] = {}

    def _ledger(self, replica: str) -> ReplicaLedger:
        ledger = self._ledgers.get(replica)
        if ledger is None:
            ledger = self._ledgers[replica] = ReplicaLedger()
        return ledger

    def update_load(self, replica: str, load: ReplicaLoad) -> None:
        self._ledger(replica).update(load)

    def rank(self, candidates: Sequence[str], num_prompt_tokens: int, hashes: Sequence[bytes]) -> list[str]:
        """Candidates, cheapest first."""
        matched = self.table.matched_chunks(hashes)
        ranked = []
        for replica in candidates:
            ledger = self._ledger(replica)
            uncached = num_prompt_tokens - matched.get(replica, 0) * self.chunk_tokens
            tie_break = (ledger.load.running_kv_tokens, self.rng.random())
            ranked.append(Candidate(replica, ledger.queued_tokens(), uncached, tie_break))
        return rank_replicas(ranked, num_prompt_tokens, self.lanes)

    def on_ranked(self, replica: str, request: str, num_prompt_tokens: int, hashes: Sequence[bytes]) -> None:
        """Count a request at its first choice while Serve probes that replica's queue (an awaited
        call): requests ranked meanwhile see it. Without this, prompts that arrive together are all
        ranked against the same empty queues and scatter. `on_routed` moves it where it went."""
        self._drop_ranked(request)
        self._ledger(replica).ranked[request] = self._uncached(replica, num_prompt_tokens, hashes)

    def on_routed(self, replica: str, request: str, num_prompt_tokens: int, hashes: Sequence[bytes]) -> None:
        self._drop_ranked(request)
        in_flight = self._ledger(replica).in_flight
        in_flight[request] = (self._uncached(replica, num_prompt_tokens, hashes), self.clock())
        if len(in_flight) > MAX_IN_FLIGHT_PER_REPLICA:  # completions that never came: the oldest go
            del in_flight[next(iter(in_flight))]
        self.table.record(replica, hashes)

    def _uncached(self, replica: str, num_prompt_tokens: int, hashes: Sequence[bytes]) -> int:
        return num_prompt_tokens - self.table.matched_chunks(hashes).get(replica, 0) * self.chunk_tokens

    def _drop_ranked(self, request: str) -> None:
        for ledger in self._ledgers.values():
            ledger.ranked.pop(request, None)

    def on_completed(self, replica: str, request: str) -> None:
        """A finished request's prompt is no longer queued anywhere."""
        self._ledger(replica).complete(request, self.clock())

    def forget(self, replica: str) -> None:
        self.table.forget(replica)
        self._ledgers.pop(replica, None)
