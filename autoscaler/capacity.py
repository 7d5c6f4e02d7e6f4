"""How many replicas a load needs: four constraints, each in the unit it is measured in.

  prefill  Little's law in tokens: W seconds of queued prefill (net of prefix hits) drain within
           the TTFT target T when ceil(W / T) replicas work on them. W is the replicas' own
           estimate (measured FLOP rate, quadratic attention included), or queued tokens over a
           configured rate: ceil(queued tokens / (tokens/s per replica x T)).
  lanes    One prompt cannot be split over replicas, so a replica owing a long prefill is busy
           for its whole length, and a short request routed to it waits behind it. While any
           replica is busy, `spare_replicas` more are kept free for short requests.
  kv       Running KV tokens fit at `kv_target_utilization` of each replica's KV cache.
  decode   Decoding sequences at most `decode_sequences_per_replica` per replica.

`headroom` < 1 tightens every target: the policy scales down to m replicas only when the load
fits m with that margin (hysteresis), so a load on the boundary does not flap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoscaler.signal import ClusterSignal, ReplicaSignal
from cluster.config import AutoscalingSettings


@dataclass(frozen=True)
class Requirement:
    prefill: int
    lanes: int
    kv: int
    decode: int

    @property
    def replicas(self) -> int:
        return max(self.prefill, self.lanes, self.kv, self.decode)

    @property
    def binding(self) -> str:
        """The constraint that sets the count (the first of equals)."""
        counts = {"prefill": self.prefill, "lanes": self.lanes, "kv": self.kv, "decode": self.decode}
        return max(counts, key=counts.__getitem__)


def prefill_seconds(replica: ReplicaSignal, settings: AutoscalingSettings) -> float:
    if settings.prefill_tokens_per_s is not None:
        return replica.pending_prefill_tokens / settings.prefill_tokens_per_s
    return replica.pending_prefill_s


def required_replicas(signal: ClusterSignal, settings: AutoscalingSettings, headroom: float = 1.0) -> Requirement:
    return Requirement(
        prefill=_prefill_replicas(signal, settings, headroom),
        lanes=_lane_replicas(signal, settings),
        kv=_kv_replicas(signal, settings, headroom),
        decode=_ceil(signal.total("num_decoding") / (settings.decode_sequences_per_replica * headroom)),
    )


def _prefill_replicas(signal: ClusterSignal, settings: AutoscalingSettings, headroom: float) -> int:
    queued_s = sum(prefill_seconds(replica, settings) for replica in signal.replicas)
    return _ceil(queued_s / (settings.ttft_target_s * headroom))


def _lane_replicas(signal: ClusterSignal, settings: AutoscalingSettings) -> int:
    busy = sum(prefill_seconds(replica, settings) > settings.interactive_ttft_s for replica in signal.replicas)
    return busy + settings.spare_replicas if busy else 0


def _kv_replicas(signal: ClusterSignal, settings: AutoscalingSettings, headroom: float) -> int:
    capacity = signal.kv_capacity_tokens() * settings.kv_target_utilization * headroom
    return _ceil(signal.total("running_kv_tokens") / capacity) if capacity > 0 else 0


def _ceil(value: float) -> int:
    # 1e-9: a load of exactly n replicas' worth, summed in floating point, is not n + 1
    return max(0, math.ceil(value - 1e-9))
