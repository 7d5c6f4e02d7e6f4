"""Truthful Redis health: an idle replica (no requests at all) reports Redis up and down from
the workers' background ping, in longctx_kv_redis_up and the engine's stats; the start-up
warning names only the shards that did not answer."""

from __future__ import annotations

import logging

from tier_helpers import metric, wait_for

from cluster.config import CacheSettings, KVTierSettings, LongctxConfig, ModelSettings
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine

FAST_HEALTH = {"redis_health_check_period_s": 0.2, "redis_socket_timeout_s": 0.3, "redis_retry_backoff_s": 0.1,
               "redis_retry_backoff_max_s": 0.1}  # fmt: skip


def _engine(model_dir: str, urls: tuple[str, ...]) -> LLMEngine:
    return LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, device="cpu"),
        cache=CacheSettings(block_size=64, num_device_blocks=64),
        kv_tiers=KVTierSettings(host_bytes=8 << 20, redis_urls=urls, **FAST_HEALTH),
    ))  # fmt: skip


def test_an_idle_replica_follows_redis_down_and_up(tier_model_dir, start_redis):
    server = start_redis()
    engine = AsyncEngine(_engine(tier_model_dir, (server.url,)))
    try:
        assert wait_for(lambda: metric(engine.engine, "longctx_kv_redis_up") == 1)
        assert engine.stats().kv_redis_up is True
        server.kill()  # no request flows: only the background ping can notice
        assert wait_for(lambda: metric(engine.engine, "longctx_kv_redis_up") == 0)
        assert wait_for(lambda: engine.stats().kv_redis_up is False)
        start_redis(server.port)
        assert wait_for(lambda: metric(engine.engine, "longctx_kv_redis_up") == 1)
        assert engine.seconds_since_last_step() < 5  # health steps do not look like a stall
    finally:
        engine.shutdown()


def test_the_start_up_warning_names_only_the_shards_that_failed(tier_model_dir, start_redis, free_tcp_port, caplog):
    healthy = start_redis()
    dead = f"redis://127.0.0.1:{free_tcp_port}/0"
    with caplog.at_level(logging.WARNING):
        engine = _engine(tier_model_dir, (healthy.url, dead))
    warnings = [record.getMessage() for record in caplog.records if "unreachable at start" in record.getMessage()]
    assert len(warnings) == 1
    assert f"127.0.0.1:{free_tcp_port}" in warnings[0] and f"127.0.0.1:{healthy.port}" not in warnings[0]
    engine.shutdown()
