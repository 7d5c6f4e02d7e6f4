"""The cost policy inside whole engines (tiny model, CPU, real redis-server): the start-up
calibration (engine/calibration.py) and a Redis restore that recomputes a head while the rest is
fetched, whose outputs must equal recomputing everything."""

from __future__ import annotations

import logging
import re

from test_tiers_engine import GREEDY, make_engine, reference  # noqa: F401 (a fixture)
from tier_helpers import document, metric

from cluster.config import KVTierSettings
from engine.calibration import calibrate_restore_estimates
from engine.offline import generate
from kvcache.tiers.cost_model import _INITIAL_FETCH_S, _INITIAL_STEP_S

BLOCK = 64


def cost_engine(model_dir: str, url: str, budget: int = 2048, **tiers):
    return make_engine(model_dir, block_size=BLOCK, budget=budget, host_bytes=32 << 20, redis_urls=(url,), **tiers)


def test_the_engine_calibrates_its_estimates_at_start_and_logs_them(tier_model_dir, redis_server, reference, caplog):
    # 512-token chunks and a generous budget: this shared CPU takes ~1.5 s for one 2048-token chunk.
    with caplog.at_level(logging.INFO, logger="engine.calibration"):
        engine = cost_engine(tier_model_dir, redis_server.url, budget=512, calibration_budget_s=60.0)
    assert "restore estimates calibrated" in caplog.text and "a Redis restore wins from" in caplog.text
    assert "(6 prefills, 4 transfers" in caplog.text  # a block, a quarter, half, one, two and three chunks
    round_trips_ms = float(re.search(r"a prefetch's round trips ([0-9.]+) ms", caplog.text).group(1))
    assert round_trips_ms > 0  # a probe and a fetch answered through engine steps
    cost = engine.kv_cache.tiers.cost
    assert cost.prefill.coefficients[0] != _INITIAL_STEP_S and cost.redis_fetch.coefficients[0] != _INITIAL_FETCH_S
    assert cost.prefill.num_observations == 0  # priors: the first request still corrects them at once
    assert redis_server.client().dbsize() == 0  # the probe's keys are gone
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks  # and so are its blocks
    assert metric(engine, "longctx_kv_transfer_bytes_total", {"path": "redis_to_host"}) == 0  # not counted as traffic
    doc = document(300, seed=41)
    assert generate(engine, [doc], GREEDY)[0][0].token_ids == reference([doc])[0]


def test_no_budget_no_probe(tier_model_dir, redis_server):
    engine = cost_engine(tier_model_dir, redis_server.url, calibration_budget_s=0.0)
    assert engine.kv_cache.tiers.cost.prefill.coefficients[0] == _INITIAL_STEP_S
    assert KVTierSettings().calibration_budget_s > 0  # on by default


def test_a_restore_that_recomputes_its_head_while_fetching_the_rest_is_exact(tier_model_dir, redis_server, reference):
    doc = document(1000, seed=42)  # 15 full blocks, then 40 tokens
    writer = make_engine(tier_model_dir, block_size=BLOCK, host_bytes=32 << 20, redis_urls=(redis_server.url,),
                         restore_policy="always")
    generate(writer, [doc], GREEDY)
    reader = cost_engine(tier_model_dir, redis_server.url, calibration_budget_s=0.0, restore_margin=0.0,
                         initial_split_fetch_slowdown=1.0)  # a fetch as fast beside a head: splits are planned
    _make_a_block_cost_one_millisecond_either_way(reader)
    result = generate(reader, [doc], GREEDY)[0][0]
    # 15 blocks: recomputing h of them takes 1 + h ms, fetching the other 15 - h takes 2 + 15 - h:
    # even at h = 8, where both take 9 ms (against 16 ms to recompute them all).
    assert result.num_redis_hit_tokens == result.num_prefix_hit_tokens == 7 * BLOCK
    assert result.token_ids == reference([doc])[0]
    assert metric(reader, "longctx_kv_restore_decisions_total", {"tier": "redis", "decision": "restore"}) == 1


def _make_a_block_cost_one_millisecond_either_way(engine) -> None:
    """Priors for the test: a step 1 ms + 1 ms per block of prefill (attention and context
    free); a prefetch 2 ms + 1 ms per block; loads free."""
    cost = engine.kv_cache.tiers.cost
    cost.prefill.reset((1e-3, 1e-3 / (BLOCK * cost.flops.per_token), 1e-30, 1e-30, 1e-30))
    cost.redis_fetch.reset((2e-3, 1e-3 / cost.block_nbytes))
    cost.host_load.reset((1e-9, 1e-30))


def test_the_probe_times_whole_requests_saving_each_chunk_in_the_next_step(tier_model_dir, redis_server):
    """A step that samples nothing returns before its kernels ran (on a GPU), so each request is one
    timing; with write-through each step after the first saves the chunk before it, as serving does."""
    engine = cost_engine(tier_model_dir, redis_server.url, budget=512, calibration_budget_s=0.0)
    sent = []

    class Recording:
        def execute(self, step):
            sent.append(step)
            return engine.executor.execute(step)

    config = engine.config.model_copy(update={"kv_tiers": engine.config.kv_tiers.model_copy(
        update={"calibration_budget_s": 60.0})})
    calibrate_restore_estimates(config, Recording(), engine.kv_cache, engine.architecture.vocab_size,
                                engine.max_model_len)
    chunks = [step.scheduled_spans()[0] for step in sent if step.num_scheduled_tokens]
    assert chunks[-3:] == [(0, 512), (512, 512), (1024, 512)]  # three chunks of the step budget, last
    assert len(chunks) == 2 * (4 + 2 + 3)  # a block, a quarter, half, one, two, three chunks; warm-up, timed
    saves = [step.kv_transfers.saves for step in sent if step.num_scheduled_tokens and step.kv_transfers]
    assert [len(s) for s in saves[-2:]] == [512 // BLOCK] * 2  # the chunk before, block by block
    assert engine.kv_cache.tiers.cost.prefill.num_observations == 0
