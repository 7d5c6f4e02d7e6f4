"""The KV tiers on a GPU: pinned host memory, staged and direct copies, whole engines. Skipped
without CUDA (the CPU tests cover the same logic; these check the CUDA copies and streams)."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.config import CacheSettings, KVTierSettings, LongctxConfig, ModelSettings
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_io.kv_transfer import KVTransfer
from protocol.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 256])  # 32 KiB blocks are staged, >= 1 MiB copied directly
def test_device_host_round_trip_on_cuda_is_bit_exact(dtype, block_size):
    cache = KVCacheTensors(12, 8, block_size, 4, 64, dtype, "cuda")
    cache.data.view(torch.uint8).random_()
    before = cache.data.clone()
    transfer = KVTransfer(cache, num_slots=12, chunk_bytes=5 * cache.bytes_per_block)
    assert transfer.host.is_pinned()
    pairs = [(11, 3), (2, 4), (3, 5), (7, 0), (0, 11), (5, 6)]
    transfer.save(pairs)
    cache.data.zero_()
    transfer.load([(slot, block) for block, slot in pairs])
    bits = _INT_OF[dtype]
    for block, _ in pairs:
        assert torch.equal(cache.data[block].view(bits), before[block].view(bits))


def engine(model_dir: str, **tiers) -> LLMEngine:
    return LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="bfloat16", device="cuda"),
        cache=CacheSettings(block_size=16, num_device_blocks=40),
        kv_tiers=KVTierSettings(**tiers)))


def test_an_engine_on_cuda_restores_from_host_and_redis_exactly(tier_model_dir, start_redis):
    """A restored prefix gives the tokens a device prefix hit gives: the same bits, the same
    computation of the uncached tail (a full recompute in bf16 may round differently)."""
    rng = random.Random(0)
    doc, filler = ([rng.randrange(10, 1000) for _ in range(400)] for _ in range(2))
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0)
    url = start_redis().url
    tiered = engine(tier_model_dir, host_bytes=1 << 24, redis_urls=(url,), restore_policy="always")
    generate(tiered, [doc], params)
    device_hit = generate(tiered, [doc], params)[0][0]
    generate(tiered, [filler], params)  # evicts the document's blocks: they spill to host
    host_hit = generate(tiered, [doc], params)[0][0]
    other_replica = engine(tier_model_dir, host_bytes=1 << 24, redis_urls=(url,), restore_policy="always")
    redis_hit = generate(other_replica, [doc], params)[0][0]
    assert device_hit.num_prefix_hit_tokens == host_hit.num_prefix_hit_tokens == 384
    assert host_hit.num_host_hit_tokens > 0 and redis_hit.num_redis_hit_tokens == 384
    assert host_hit.token_ids == redis_hit.token_ids == device_hit.token_ids
    assert [t.logprob for t in host_hit.logprobs] == [t.logprob for t in device_hit.logprobs]
