"""The KV tiers under tensor and sequence parallelism (two gloo ranks on the CPU, float32).

Each rank spills, restores, writes and fetches its own shard of every block under its own Redis
namespace; the driver hears a remote outcome only once both ranks have it (a miss on either is
a miss). Greedy outputs must equal one rank's without tiers.
"""

from __future__ import annotations

import pytest
from tier_helpers import damage_block, document, metric

from cluster.config import (
    CacheSettings,
    KVTierSettings,
    LongctxConfig,
    ModelSettings,
    ParallelSettings,
    SchedulerSettings,
)
from engine.llm_engine import LLMEngine
from engine.offline import generate
from executors.local import LocalProcessExecutor
from protocol.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
LAYOUTS = {"tp2": (2, 1), "sp2": (1, 2)}


def tiered_config(model_dir: str, tp: int, sp: int, *, block_size: int, num_blocks: int, **tiers) -> LongctxConfig:
    return LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="float32", device="cpu"),
        cache=CacheSettings(block_size=block_size, num_device_blocks=num_blocks),
        scheduler=SchedulerSettings(max_tokens_per_step=512),
        parallel=ParallelSettings(tensor_parallel_size=tp, sequence_parallel_size=sp),
        kv_tiers=KVTierSettings(restore_policy="always", **tiers),
    )


@pytest.fixture
def run_parallel(world2):
    """run_parallel(config, prompts) -> (engine, results) on the two ranks; executors shut down after."""
    executors = []

    def run(config: LongctxConfig, prompts: list[list[int]]):
        executors.append(LocalProcessExecutor(config, processes=world2))
        engine = LLMEngine(config, executor=executors[-1])
        return engine, [sequences[0] for sequences in generate(engine, prompts, GREEDY)]

    yield run
    for executor in executors:
        executor.shutdown()


def one_rank_tokens(model_dir: str, prompts, block_size: int) -> list[list[int]]:
    engine = LLMEngine(tiered_config(model_dir, 1, 1, block_size=block_size, num_blocks=512))
    return [sequences[0].token_ids for sequences in generate(engine, prompts, GREEDY)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_spills_and_restores_its_shard_through_host_memory(layout, tier_model_dir, run_parallel):
    doc, filler = document(400, seed=7), document(400, seed=8)  # 26 blocks of 16 each, with outputs
    config = tiered_config(tier_model_dir, *LAYOUTS[layout], block_size=16, num_blocks=40, host_bytes=1 << 20)
    engine, results = run_parallel(config, [doc])
    for prompt in (filler, doc):  # the filler evicts the doc's last 12 blocks: they spill to host
        results += [sequences[0] for sequences in generate(engine, [prompt], GREEDY)]
    assert [r.token_ids for r in results] == one_rank_tokens(tier_model_dir, [doc, filler, doc], 16)
    assert results[2].num_prefix_hit_tokens == 384 and results[2].num_host_hit_tokens == 384 - 224


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_second_engine_prefills_from_every_ranks_redis_shard(layout, tier_model_dir, redis_server, run_parallel):
    doc = document(1000, seed=3)  # 15 full blocks of 64
    config = tiered_config(tier_model_dir, *LAYOUTS[layout], block_size=64, num_blocks=256, host_bytes=32 << 20,
                           redis_urls=(redis_server.url,))
    _, (first,) = run_parallel(config, [doc])
    assert redis_server.client().dbsize() == 2 * 15  # one value per block and rank
    _, (second,) = run_parallel(config, [doc])
    assert second.num_redis_hit_tokens == 15 * 64
    assert second.token_ids == first.token_ids == one_rank_tokens(tier_model_dir, [doc], 64)[0]


def test_a_block_damaged_on_one_rank_only_is_a_miss_for_both(tier_model_dir, redis_server, run_parallel):
    doc = document(1000, seed=3)
    config = tiered_config(tier_model_dir, 2, 1, block_size=64, num_blocks=256, host_bytes=32 << 20,
                           redis_urls=(redis_server.url,))
    writer, _ = run_parallel(config, [doc])
    assert damage_block(redis_server.client(), writer, doc, index=5, damage="flip") == 2  # one value per rank
    reader, (result,) = run_parallel(config, [doc])
    assert result.num_redis_hit_tokens == 5 * 64  # blocks 0-4; 5 failed on one rank, 6.. are past the break
    assert metric(reader, "longctx_kv_redis_fetches_total", {"outcome": "checksum"}) == 1
    assert result.token_ids == one_rank_tokens(tier_model_dir, [doc], 64)[0]
