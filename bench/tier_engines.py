"""Shared by the KV-tier benches: engines of a Llama-3-8B-shaped model with few layers (GPU) or a
tiny one (CPU), and the TTFT of one prompt with where its prefix came from."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cluster.config import (
    CacheSettings,
    KVTierSettings,
    LongctxConfig,
    ModelSettings,
    SchedulerSettings,
)
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_shards.make_model import make_model
from protocol.sampling_params import SamplingParams


def engine_for(args, model_dir: str, num_blocks: int, redis_url: str | None, **tiers) -> LLMEngine:
    """`args`: device, model_dtype, ttft_block_size, max_tokens_per_step."""
    tier_settings = KVTierSettings(redis_urls=(redis_url,), **tiers) if redis_url else KVTierSettings(**tiers)
    engine = LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, dtype=args.model_dtype, device=args.device),
        cache=CacheSettings(block_size=args.ttft_block_size, num_device_blocks=num_blocks),
        scheduler=SchedulerSettings(max_tokens_per_step=args.max_tokens_per_step),
        kv_tiers=tier_settings))
    generate(engine, [list(range(10, 74))], SamplingParams(max_tokens=2))  # warm-up: kernels, allocator
    return engine


def make_ttft_model(args, folder: str, max_tokens: int) -> tuple[str, int]:
    """(model folder, vocabulary size): Llama-3-8B's shape with `args.ttft_layers` layers on a
    GPU, the tiny preset on the CPU; positions for `max_tokens`."""
    folder = Path(folder) / "model"
    positions = max(131072, 2 * max_tokens)
    if args.device.startswith("cuda"):
        path = make_model(folder, "llama3-8b-shape", num_hidden_layers=args.ttft_layers,
                          max_position_embeddings=positions)
        return str(path), 128_256
    return str(make_model(folder, "tiny", seed=1, max_position_embeddings=max(16384, 2 * max_tokens))), 1024


def ttft_row(scenario: str, engine: LLMEngine, prompt: list[int]) -> dict:
    result = generate(engine, [prompt], SamplingParams(max_tokens=1))[0][0]
    host, redis = result.num_host_hit_tokens, result.num_redis_hit_tokens
    return {"scenario": scenario, "ttft_s": round(result.ttft_s, 4),
            "device_hit_tokens": result.num_prefix_hit_tokens - host - redis, "host_hit_tokens": host,
            "redis_hit_tokens": redis, "computed_tokens": len(prompt) - result.num_prefix_hit_tokens}


def settle(engine: LLMEngine, timeout_s: float = 120.0) -> None:
    """Step an idle engine until its background Redis writes are done (so another replica sees them)."""
    deadline = time.monotonic() + timeout_s
    while engine.kv_cache.tiers.num_pending and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.001)


def release(engine: LLMEngine) -> None:
    engine.shutdown()
    if engine.config.model.device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
