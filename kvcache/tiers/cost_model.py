"""Restore or recompute: estimated restore time per tier against estimated recompute time.

Both sides are measured while serving: each transfer the worker reports updates an EMA of that
path's bandwidth, each step that computed tokens updates an EMA of the prefill rate; the
settings' initial values stand in until then. Restoring n blocks from a tier costs
n * block bytes over the bandwidth of every hop (Redis -> host -> device), recomputing them
costs n * block_size tokens at the prefill rate. Both grow linearly in n, so one comparison per
request and tier decides the whole run. The prefill rate is an average over the contexts seen;
at contexts much longer than those, attention makes recompute slower than estimated, so the
error is on the side of recomputing.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import KVTierSettings
from kvcache.tiers.host_index import HOST, REDIS
from kvcache.tiers.ops import DEVICE_TO_HOST, HOST_TO_DEVICE, HOST_TO_REDIS, REDIS_TO_HOST

# A smaller sample mostly measures call overhead, not bandwidth.
_MIN_SAMPLE_BYTES = 64 << 10
_PATHS_OF_TIER = {HOST: (HOST_TO_DEVICE,), REDIS: (REDIS_TO_HOST, HOST_TO_DEVICE)}


class Ema:
    def __init__(self, initial: float, alpha: float):
        self.value = initial
        self.alpha = alpha

    def update(self, sample: float) -> None:
        self.value += self.alpha * (sample - self.value)


@dataclass(frozen=True)
class Decision:
    tier: str
    num_blocks: int
    restore: bool
    restore_s: float
    recompute_s: float


class RestoreCostModel:
    def __init__(self, settings: KVTierSettings, block_size: int, block_nbytes: int):
        self.policy = settings.restore_policy
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        host, remote = settings.initial_host_bandwidth_bytes_per_s, settings.initial_redis_bandwidth_bytes_per_s
        self.bandwidth = {
            DEVICE_TO_HOST: Ema(host, settings.ema_alpha),
            HOST_TO_DEVICE: Ema(host, settings.ema_alpha),
            HOST_TO_REDIS: Ema(remote, settings.ema_alpha),
            REDIS_TO_HOST: Ema(remote, settings.ema_alpha),
        }
        self.prefill_tokens_per_s = Ema(settings.initial_prefill_tokens_per_s, settings.ema_alpha)

    def observe_transfer(self, path: str, nbytes: int, seconds: float) -> None:
        if nbytes >= _MIN_SAMPLE_BYTES and seconds > 0:
            self.bandwidth[path].update(nbytes / seconds)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s.update(num_tokens / seconds)

    def restore_seconds(self, tier: str, num_blocks: int) -> float:
        nbytes = num_blocks * self.block_nbytes
        return sum(nbytes / self.bandwidth[path].value for path in _PATHS_OF_TIER[tier])

    def recompute_seconds(self, num_blocks: int) -> float:
        return num_blocks * self.block_size / self.prefill_tokens_per_s.value

    def decide(self, tier: str, num_blocks: int) -> Decision:
        restore_s, recompute_s = self.restore_seconds(tier, num_blocks), self.recompute_seconds(num_blocks)
        restore = {"always": True, "never": False}.get(self.policy, restore_s < recompute_s)
        return Decision(tier, num_blocks, restore, restore_s, recompute_s)
