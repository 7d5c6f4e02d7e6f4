"""The autoscaler's input: what each replica owes, in tokens and seconds. Plain Python, no Ray.

Replicas report it through Serve's `record_autoscaling_stats` (deployments/llm_server.py), one
float per key; the simulator builds it from its model replicas. Requests are never counted
here: a replica with one queued 1M-token prompt and one with a thousand chat turns report
what they owe, not how many callers wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ReplicaSignal:
    pending_prefill_tokens: float = 0.0  # prompt tokens still to compute, net of prefix hits
    pending_prefill_s: float = 0.0  # the replica's own estimate of their compute time
    running_kv_tokens: float = 0.0  # KV held by sequences in the running batch
    kv_capacity_tokens: float = 0.0  # device KV cache size
    num_decoding: float = 0.0  # sequences past their prompt (the decode load)
    longest_request_tokens: float = 0.0  # prompt + output of its longest request in flight

    def as_metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> ReplicaSignal:
        """Missing keys read as 0 (a replica that has not reported yet owes nothing known)."""
        return cls(**{field.name: float(metrics[field.name]) for field in fields(cls) if field.name in metrics})


METRIC_KEYS = tuple(field.name for field in fields(ReplicaSignal))


@dataclass(frozen=True)
class ClusterSignal:
    """The running replicas' latest reports; `num_target` also counts replicas still starting."""

    replicas: tuple[ReplicaSignal, ...]
    num_target: int

    @property
    def num_running(self) -> int:
        return len(self.replicas)

    def total(self, key: str) -> float:
        return sum(getattr(replica, key) for replica in self.replicas)

    def kv_capacity_tokens(self) -> float:
        """One replica's KV capacity (replicas are alike): the largest reported."""
        return max((replica.kv_capacity_tokens for replica in self.replicas), default=0.0)

    def holds_long_request(self, long_request_tokens: int) -> bool:
        return any(replica.longest_request_tokens >= long_request_tokens for replica in self.replicas)
