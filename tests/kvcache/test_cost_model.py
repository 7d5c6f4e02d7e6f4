"""Restore-or-recompute estimates (kvcache/tiers/cost_model.py): FLOP counts and decisions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.config import KVTierSettings
from kvcache.tiers.cost_model import PrefillFlops, RestoreCostModel
from kvcache.tiers.host_index import HOST, REDIS
from protocol.kv_transfer_ops import HOST_TO_DEVICE, REDIS_TO_HOST

LLAMA_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128)
BLOCK = 64
BLOCK_NBYTES = 32 * 2 * 8 * 128 * 2 * BLOCK  # layers x K,V x KV heads x head dim x bf16 x tokens: 8 MiB


def test_prefill_flops_of_an_8b_model():
    flops = PrefillFlops.of(LLAMA_8B)
    # 6.98e9 weights outside the embeddings, two FLOPs each per token
    assert flops.per_token == 2 * 32 * (4096 * 128 * (64 + 16) + 3 * 4096 * 14336) == pytest.approx(13.96e9, rel=1e-3)
    assert flops.per_key == 4 * 32 * 32 * 128
    assert flops.span(0, 3) == 3 * flops.per_token + (1 + 2 + 3) * flops.per_key  # position p sees p + 1 keys
    assert flops.span(2, 4) == 2 * flops.per_token + (3 + 4) * flops.per_key
    assert flops.of_step([(0, 3), (2, 2)]) == flops.span(0, 3) + flops.span(2, 4)


def test_the_cost_of_a_block_grows_with_its_position():
    flops = PrefillFlops.of(LLAMA_8B)
    first, last = flops.span(0, BLOCK), flops.span((1 << 20) - BLOCK, 1 << 20)
    assert last / first == pytest.approx(40.3, rel=0.01)  # attention to a million keys dominates


def cost_model(flops: PrefillFlops) -> RestoreCostModel:
    """Redis at 1 GB/s, PCIe at 50 GB/s; prefill measured on 8K-token prompts at 0.3 s each."""
    model = RestoreCostModel(KVTierSettings(ema_alpha=1.0), BLOCK, BLOCK_NBYTES, flops)
    model.observe_transfer(REDIS_TO_HOST, 1 << 30, (1 << 30) / 1e9)
    model.observe_transfer(HOST_TO_DEVICE, 1 << 30, (1 << 30) / 50e9)
    model.observe_prefill([(0, 8192)], 0.3)
    return model


def test_a_million_token_prefix_is_restored_although_a_rate_in_tokens_would_recompute_it():
    blocks = (1 << 20) // BLOCK  # 128 GiB of KV: ~140 s from Redis
    decision = cost_model(PrefillFlops.of(LLAMA_8B)).decide(REDIS, 0, blocks)
    assert decision.restore_s == pytest.approx(140.2, rel=0.01)
    assert decision.recompute_s == pytest.approx(689, rel=0.01)  # quadratic attention, at the 8K-measured speed
    assert decision.restore
    linear = cost_model(PrefillFlops.tokens_only()).decide(REDIS, 0, blocks)
    assert linear.recompute_s == pytest.approx(38.4, rel=0.01) and not linear.restore  # the error this avoids


def test_a_short_prefix_is_recomputed_when_redis_is_slower():
    decision = cost_model(PrefillFlops.of(LLAMA_8B)).decide(REDIS, 0, 32)  # 2K tokens, 268 MB
    assert decision.recompute_s < decision.restore_s and not decision.restore


def test_the_first_measurement_replaces_the_initial_guess():
    model = RestoreCostModel(KVTierSettings(ema_alpha=0.2, initial_prefill_tokens_per_s=10_000), BLOCK,
                             BLOCK_NBYTES, PrefillFlops.tokens_only())
    model.observe_prefill([(0, 8192)], 0.025)  # 327,680 tokens/s
    assert model.prefill_flops_per_s.value == pytest.approx(327_680)
    model.observe_prefill([(0, 8192)], 0.05)
    assert model.prefill_flops_per_s.value == pytest.approx(0.8 * 327_680 + 0.2 * 163_840)


def test_a_redis_restore_is_charged_its_measured_round_trips():
    model = cost_model(PrefillFlops.of(LLAMA_8B))
    model.observe_transfer(REDIS_TO_HOST, 1 << 30, (1 << 30) / 10e9)  # Redis at 10 GB/s, PCIe at 50
    per_block_s = BLOCK_NBYTES * (1 / 10e9 + 1 / 50e9)
    model.observe_redis_restore(4, 4 * BLOCK_NBYTES / 10e9 + 0.100)  # 100 ms beyond moving the bytes
    assert model.redis_overhead_s.value == pytest.approx(0.100)
    assert model.restore_seconds(REDIS, 8) == pytest.approx(8 * per_block_s + 0.100)
    assert model.restore_seconds(HOST, 8) == pytest.approx(8 * BLOCK_NBYTES / 50e9)  # host: no round trips
    recompute_s = model.recompute_seconds(0, 8)  # 512 tokens: 16 ms
    assert 8 * per_block_s < recompute_s < model.restore_seconds(REDIS, 8)
    assert not model.decide(REDIS, 0, 8).restore  # the bytes alone would have said restore
