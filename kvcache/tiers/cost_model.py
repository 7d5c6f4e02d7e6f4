"""Restore or recompute: estimated restore time per tier against estimated recompute time.

Both sides are measured while serving: each transfer the worker reports updates an EMA of that
path's bandwidth; each step that computed a prefill chunk updates an EMA of the prefill speed;
the settings' initial values stand in until then. Restoring n blocks from a tier costs
n * block bytes over the bandwidth of every hop (Redis -> host -> device).

Recompute is not linear in tokens: a token at position p attends to p + 1 keys, so the last
block of a 1M-token prefix costs several times what the first does, and at 1M tokens attention
is most of the prefill (an 8B model: ~14 GFLOP of weights per token against ~0.5 MFLOP per
attended key, equal at ~27K keys). A rate in tokens/s measured on short prompts would put a
1M-token recompute at a fraction of its real time and refuse restores that win by minutes. So
the speed is kept in FLOP/s, and a span of tokens costs its weight FLOPs plus its causal
attention FLOPs (`PrefillFlops`, from the architecture); a step's FLOPs over its time is one
sample. (The constant factors cancel: what matters is that one rate fits short and long.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.config import KVTierSettings
from kvcache.tiers.host_index import HOST, REDIS
from protocol.kv_transfer_ops import (
    DEVICE_TO_HOST,
    HOST_TO_DEVICE,
    HOST_TO_REDIS,
    REDIS_TO_HOST,
)

if TYPE_CHECKING:  # the control plane reads config.json shapes, never model code
    from model_folder.hf_config import ModelArchitecture

# A smaller sample mostly measures call overhead, not bandwidth.
_MIN_SAMPLE_BYTES = 64 << 10
_PATHS_OF_TIER = {HOST: (HOST_TO_DEVICE,), REDIS: (REDIS_TO_HOST, HOST_TO_DEVICE)}


class Ema:
    """An exponential moving average whose first sample replaces the initial guess: a guess off
    by 30x (10K tokens/s against an H100's 300K) would otherwise weigh on a dozen decisions."""

    def __init__(self, initial: float, alpha: float):
        self.value = initial
        self.alpha = alpha
        self.measured = False

    def update(self, sample: float) -> None:
        self.value = self.value + self.alpha * (sample - self.value) if self.measured else sample
        self.measured = True


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs of computing positions [start, end) of one sequence, whose keys start at 0."""

    per_token: float  # 2 x the weights one token passes through (projections and MLP)
    per_key: float  # QK^T and PV for one (query, key) pair over every layer and head

    @classmethod
    def of(cls, arch: ModelArchitecture) -> PrefillFlops:
        attention_weights = arch.hidden_size * arch.head_dim * (2 * arch.num_attention_heads
                                                                 + 2 * arch.num_key_value_heads)
        mlp_weights = 3 * arch.hidden_size * arch.intermediate_size
        return cls(per_token=2.0 * arch.num_hidden_layers * (attention_weights + mlp_weights),
                   per_key=4.0 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim)

    @classmethod
    def tokens_only(cls) -> PrefillFlops:
        """One "FLOP" per token: a rate in tokens/s, for callers without an architecture."""
        return cls(per_token=1.0, per_key=0.0)

    def span(self, start: int, end: int) -> float:
        keys = (end * (end + 1) - start * (start + 1)) // 2  # position p attends to p + 1 keys
        return self.per_token * (end - start) + self.per_key * keys

    def of_step(self, spans: Iterable[tuple[int, int]]) -> float:
        """(first position, tokens) of each scheduled chunk."""
        return sum(self.span(start, start + count) for start, count in spans)


@dataclass(frozen=True)
class Decision:
    tier: str
    num_blocks: int
    restore: bool
    restore_s: float
    recompute_s: float


class RestoreCostModel:
    def __init__(self, settings: KVTierSettings, block_size: int, block_nbytes: int,
                 flops: PrefillFlops | None = None):
        self.policy = settings.restore_policy
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.flops = flops or PrefillFlops.tokens_only()
        host, remote = settings.initial_host_bandwidth_bytes_per_s, settings.initial_redis_bandwidth_bytes_per_s
        self.bandwidth = {
            DEVICE_TO_HOST: Ema(host, settings.ema_alpha),
            HOST_TO_DEVICE: Ema(host, settings.ema_alpha),
            HOST_TO_REDIS: Ema(remote, settings.ema_alpha),
            REDIS_TO_HOST: Ema(remote, settings.ema_alpha),
        }
        # The initial rate is given in tokens/s of short prompts (weights only).
        initial = settings.initial_prefill_tokens_per_s * self.flops.per_token
        self.prefill_flops_per_s = Ema(initial, settings.ema_alpha)
        # What a Redis restore costs beyond moving its bytes: the probe's and the fetch's round
        # trips and the engine steps in between (~0.1 s on the H100 host, where a 16K-token
        # prefix moves in 0.07 s and recomputes in 0.06 s).
        self.redis_overhead_s = Ema(0.0, settings.ema_alpha)

    def observe_transfer(self, path: str, nbytes: int, seconds: float) -> None:
        if nbytes >= _MIN_SAMPLE_BYTES and seconds > 0:
            self.bandwidth[path].update(nbytes / seconds)

    def observe_prefill(self, spans: Iterable[tuple[int, int]], seconds: float) -> None:
        """One step's chunks, (first position, tokens) each, and the seconds it computed them."""
        flops = self.flops.of_step(spans)
        if flops > 0 and seconds > 0:
            self.prefill_flops_per_s.update(flops / seconds)

    def observe_redis_restore(self, num_blocks: int, seconds: float) -> None:
        """A whole prefetch, probe to the last block in host memory."""
        moving_s = num_blocks * self.block_nbytes / self.bandwidth[REDIS_TO_HOST].value
        self.redis_overhead_s.update(max(0.0, seconds - moving_s))

    def restore_seconds(self, tier: str, num_blocks: int) -> float:
        nbytes = num_blocks * self.block_nbytes
        moving_s = sum(nbytes / self.bandwidth[path].value for path in _PATHS_OF_TIER[tier])
        return moving_s + (self.redis_overhead_s.value if tier == REDIS else 0.0)

    def recompute_seconds(self, first_block: int, num_blocks: int) -> float:
        start = first_block * self.block_size
        return self.flops.span(start, start + num_blocks * self.block_size) / self.prefill_flops_per_s.value

    def decide(self, tier: str, first_block: int, num_blocks: int) -> Decision:
        """Restore blocks [first_block, first_block + num_blocks) of a prompt from `tier`?"""
        restore_s = self.restore_seconds(tier, num_blocks)
        recompute_s = self.recompute_seconds(first_block, num_blocks)
        restore = {"always": True, "never": False}.get(self.policy, restore_s < recompute_s)
        return Decision(tier, num_blocks, restore, restore_s, recompute_s)
