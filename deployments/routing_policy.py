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

Loads come from the replicas' `record_routing_stats` every period; between two reports the
router adds the prompt tokens it sent itself and that have not completed, so a burst does not
all land on the replica that looked idlest at the last report.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.lanes import Candidate, LaneRule, rank_replicas
from kvcache.block_hash import hash_full_blocks, root_hash

ROUTER_FINGERPRINT = "longctx.deployments.router"  # router-only names, never compared with the engine's


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


class PrefixAwarePolicy:
    def __init__(self, chunk_tokens: int, max_entries: int, lanes: LaneRule, rng: random.Random | None = None):
        self.chunk_tokens = chunk_tokens
        self.lanes = lanes
        self.table = PrefixAffinityTable(max_entries)
        self.rng = rng or random.Random()
        self._loads: dict[str, ReplicaLoad] = {}
        self._unreported: dict[str, dict[str, int]] = {}  # replica -> request -> uncached tokens sent
        # A report taken while a request was queued keeps counting it after it finished, until the
        # next report: a finished request's tokens are credited back against that report.
        self._sent: dict[str, dict[str, tuple[int, float]]] = {}  # replica -> request -> (tokens, when)
        self._finished_credit: dict[str, int] = {}

    def update_load(self, replica: str, load: ReplicaLoad) -> None:
        previous = self._loads.get(replica)
        if previous is None or load.reported_at > previous.reported_at:
            self._unreported.pop(replica, None)  # the new report counts what was sent before it
            self._finished_credit.pop(replica, None)
        self._loads[replica] = load

    def rank(self, candidates: Sequence[str], num_prompt_tokens: int, hashes: Sequence[bytes]) -> list[str]:
        """Candidates, cheapest first."""
        matched = self.table.matched_chunks(hashes)
        ranked = []
        for replica in candidates:
            uncached = num_prompt_tokens - matched.get(replica, 0) * self.chunk_tokens
            running_kv = self._loads.get(replica, ReplicaLoad()).running_kv_tokens
            ranked.append(Candidate(replica, self._queued_tokens(replica), uncached, (running_kv, self.rng.random())))
        return rank_replicas(ranked, num_prompt_tokens, self.lanes)

    def _queued_tokens(self, replica: str) -> int:
        """The last report, less what finished since, plus what this router sent since."""
        load = self._loads.get(replica, ReplicaLoad())
        reported = max(0, load.queued_prompt_tokens - self._finished_credit.get(replica, 0))
        return reported + sum(self._unreported.get(replica, {}).values())

    def on_ranked(self, replica: str, request: str, num_prompt_tokens: int, hashes: Sequence[bytes]) -> None:
        """Count a request at its first choice while Serve probes that replica's queue (an awaited
        call): requests ranked meanwhile see it. Without this, prompts that arrive together are all
        ranked against the same empty queues and scatter. `on_routed` moves it where it went."""
        self._drop_unreported(request)
        self._unreported.setdefault(replica, {})[request] = self._uncached(replica, num_prompt_tokens, hashes)

    def on_routed(self, replica: str, request: str, num_prompt_tokens: int, hashes: Sequence[bytes]) -> None:
        self._drop_unreported(request)
        uncached = self._uncached(replica, num_prompt_tokens, hashes)
        self._unreported.setdefault(replica, {})[request] = uncached
        self._sent.setdefault(replica, {})[request] = (uncached, time.time())
        self.table.record(replica, hashes)

    def _uncached(self, replica: str, num_prompt_tokens: int, hashes: Sequence[bytes]) -> int:
        return num_prompt_tokens - self.table.matched_chunks(hashes).get(replica, 0) * self.chunk_tokens

    def _drop_unreported(self, request: str) -> None:
        for requests in self._unreported.values():
            requests.pop(request, None)

    def on_completed(self, replica: str, request: str) -> None:
        """A finished request's prompt is no longer queued anywhere."""
        self._unreported.get(replica, {}).pop(request, None)
        tokens, sent_at = self._sent.get(replica, {}).pop(request, (0, 0.0))
        load = self._loads.get(replica)
        if load is not None and load.reported_at >= sent_at:  # that report may still count it
            self._finished_credit[replica] = self._finished_credit.get(replica, 0) + tokens

    def forget(self, replica: str) -> None:
        self.table.forget(replica)
        self._loads.pop(replica, None)
        self._unreported.pop(replica, None)
        self._sent.pop(replica, None)
        self._finished_credit.pop(replica, None)
