"""The Ray Serve request router of the LLM server deployment: `PrefixAwarePolicy` on Serve's
`RequestRouter` interface.

Serve runs one router per calling handle (in each ingress replica) and asks it to rank the
replicas for each request; it then probes the best-ranked replica's queue and falls through
the ranks when one is full (`max_ongoing_requests`). Calls that are not `generate` (stats,
broadcasts) carry no prompt and go to the least loaded replica.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from autoscaler.lanes import LaneRule
from deployments.messages import GenerateRequest
from deployments.routing_policy import PrefixAwarePolicy, ReplicaLoad, prefix_hashes

MAX_PENDING_HASHES = 4096


class PrefixAwareRequestRouter(RequestRouter):
    def initialize_state(self, chunk_tokens: int, max_entries: int, long_prompt_tokens: int, short_lanes: int,
                         **_: Any) -> None:
        """The kwargs: deployments/app.py passes them from the config's serve section."""
        self.policy = PrefixAwarePolicy(chunk_tokens, max_entries, LaneRule(long_prompt_tokens, short_lanes))
        # Hashing a 1M-token prompt costs ~2 ms; a request may be ranked more than once (a full
        # replica, a retry), so its hashes are kept until it is routed.
        self._hashes: dict[str, list[bytes]] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        for replica in candidate_replicas:
            self.policy.update_load(_name(replica.replica_id), ReplicaLoad.from_stats(replica.routing_stats))
        request = _generate_request(pending_request)
        hashes = self._request_hashes(pending_request, request)
        num_tokens = len(request.prompt_token_ids) if request is not None else 0
        by_name = {_name(replica.replica_id): replica for replica in candidate_replicas}
        ranked = self.policy.rank(list(by_name), num_tokens, hashes)
        if request is not None and ranked:
            self.policy.on_ranked(ranked[0], pending_request.metadata.internal_request_id, num_tokens, hashes)
        if pending_request is not None:
            # Every rank full: wait (Serve's backoff) instead of spinning on the same replicas.
            pending_request.routing_context.should_backoff = True
        return [[by_name[name]] for name in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = _generate_request(pending_request)
        key = pending_request.metadata.internal_request_id
        hashes = self._hashes.pop(key, [])
        if request is not None:
            self.policy.on_routed(_name(replica_id), key, len(request.prompt_token_ids), hashes)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy.on_completed(_name(replica_id), internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(_name(replica_id))

    def _request_hashes(self, pending_request: PendingRequest | None, request: GenerateRequest | None) -> list[bytes]:
        if request is None or pending_request is None:
            return []
        key = pending_request.metadata.internal_request_id
        if key not in self._hashes:
            if len(self._hashes) >= MAX_PENDING_HASHES:  # requests cancelled before routing
                self._hashes.pop(next(iter(self._hashes)))
            self._hashes[key] = prefix_hashes(request.prompt_token_ids, self.policy.chunk_tokens, request.cache_salt)
        return self._hashes[key]


def _generate_request(pending_request: PendingRequest | None) -> GenerateRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, GenerateRequest) else None


def _name(replica_id: ReplicaID) -> str:
    return replica_id.unique_id
