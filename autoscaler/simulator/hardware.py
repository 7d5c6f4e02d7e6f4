"""What one simulated replica can do: prefill and decode rates, KV capacity, Redis restores.

(Its start-up time is the config's autoscaling.replica_startup_s: the policy is told the truth.)

The defaults are roughly an 8B Llama on two H200s splitting long prompts (SP=2): 80K tokens/s
of prefill on short prompts, 2M tokens of KV cache. Prefill is not linear in tokens: a token at
position p attends to p + 1 keys, and for an 8B model a token's attention FLOPs equal its
weight FLOPs at p of about 27K (kvcache/tiers/cost_model.py), so computing positions [a, b)
costs (b - a) + (b^2 - a^2) / (2 x 27K) token-equivalents: 200K tokens take 12 s, 1M take 4 min.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReplicaHardware(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_tokens_per_s: float = Field(80_000.0, gt=0, description="Prefill rate on short prompts.")
    attention_crossover_tokens: float = Field(
        27_000.0, gt=0, description="Position whose attention FLOPs equal a token's weight FLOPs.")
    decode_tokens_per_s: float = Field(30.0, gt=0, description="Tokens a second each decoding sequence gets.")
    kv_capacity_tokens: int = Field(2_000_000, ge=1, description="Device KV cache of one replica.")
    redis_restore_tokens_per_s: float | None = Field(
        80_000.0, gt=0, description="Prefix KV restored from the shared Redis tier; None: no Redis tier.")

    def prefill_seconds(self, start: int, end: int) -> float:
        """Computing prompt positions [start, end) on an otherwise idle replica."""
        attention = (end * end - start * start) / (2.0 * self.attention_crossover_tokens)
        return ((end - start) + attention) / self.prefill_tokens_per_s

    def restore_seconds(self, start: int, end: int) -> float:
        """Positions [start, end) found in Redis: restored, or recomputed when that is faster."""
        if self.redis_restore_tokens_per_s is None:
            return self.prefill_seconds(start, end)
        return min((end - start) / self.redis_restore_tokens_per_s, self.prefill_seconds(start, end))
