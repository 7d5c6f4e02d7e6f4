"""Engine configs and prompts shared by the engine-level parallelism tests."""

from __future__ import annotations

import random

from cluster.config import (
    CacheSettings,
    LongctxConfig,
    ModelSettings,
    ParallelSettings,
    SchedulerSettings,
)


def config_for(folder, tp: int = 1, sp: int = 1, budget: int = 2048) -> LongctxConfig:
    return LongctxConfig(
        model=ModelSettings(path=str(folder), dtype="float32", device="cpu"),
        cache=CacheSettings(block_size=4, num_device_blocks=256),
        scheduler=SchedulerSettings(max_tokens_per_step=budget),
        parallel=ParallelSettings(tensor_parallel_size=tp, sequence_parallel_size=sp),
    )


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(length)]
