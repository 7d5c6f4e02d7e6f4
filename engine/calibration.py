"""Start-up calibration of the restore-or-recompute estimates: a short probe of this machine.

Before the first request the engine times, on its own workers:

  prefill    throwaway requests of random tokens, never cached: one block at position 0, then
             two full chunks (the second attends to the first: it separates attention from
             weights); all of it twice, the first round untimed (first calls of a shape pay for
             kernel plans, ~70 ms each with cuDNN, and allocations);
  transfers  one block and up to CALIBRATION_BYTES each way between device and host memory,
             and host <-> Redis under throwaway keys deleted after (KVTransfer.calibrate);

and the cost model (kvcache/tiers/cost_model.py) takes the timings as its priors; serving then
corrects them with every measured step and restore. Bounded: no prefill step starts once
`kv_tiers.calibration_budget_s` is spent, and the transfers move at most CALIBRATION_BYTES per
path. The result is logged: what each estimate came to, and from how many tokens a Redis restore
beats recomputing.

The probe goes straight to the executor with hand-made StepInputs: the scheduler and the tiers
never see it, and its device blocks are allocated and freed without a name (nothing cached).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

from cluster.config import LongctxConfig
from executors import Executor
from kvcache.coordinator import KVCacheCoordinator
from protocol.kv_transfer_ops import HOST_TO_DEVICE, REDIS_TO_HOST, KVTransferOps
from protocol.sampling_params import SamplingParams
from protocol.step import CachedRequestData, NewRequestData, StepInput

logger = logging.getLogger(__name__)

CALIBRATION_BYTES = 256 << 20  # per path: enough that a transfer's bytes outweigh its fixed cost
_REQUEST_ID = "longctx-calibration"
_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)  # draws nothing from the workers' RNG

Timing = tuple[tuple[tuple[int, int], ...], float]  # ((first position, tokens) per chunk, seconds)


def calibrate_restore_estimates(config: LongctxConfig, executor: Executor, kv_cache: KVCacheCoordinator,
                                vocab_size: int, max_model_len: int) -> None:
    """Probe prefill and transfers and hand the timings to the cost model (see the module doc);
    nothing when the cost policy has no tiers to decide about or no budget."""
    tiers = kv_cache.tiers
    budget_s = config.kv_tiers.calibration_budget_s
    if tiers.host is None or tiers.cost.policy != "cost" or budget_s <= 0 or kv_cache.extra_groups:
        return  # (a hybrid model's estimates start from the defaults and learn from its steps)
    start = time.monotonic()
    steps = _prefill_timings(executor, kv_cache, config.scheduler.max_tokens_per_step, vocab_size, max_model_len,
                             deadline=start + budget_s)
    loads, fetches = _transfer_timings(executor)
    tiers.cost.calibrate(steps, loads, fetches)
    logger.info("restore estimates calibrated in %.2f s (%d prefill steps, %d transfers): %s",
                time.monotonic() - start, len(steps), len(loads) + len(fetches), tiers.cost.describe())


def _prefill_timings(executor: Executor, kv_cache: KVCacheCoordinator, budget_tokens: int, vocab_size: int,
                     max_model_len: int, deadline: float) -> list[Timing]:
    block_size = kv_cache.block_size
    # Two chunks and a block must fit the device and the positions the model knows.
    room = min(kv_cache.num_blocks * block_size, max_model_len - 1) // 2 - block_size
    chunk = min(budget_tokens, room) // block_size * block_size
    if chunk < block_size:
        return []
    rng = random.Random(0)
    timings: list[Timing] = []
    for round_ in range(2):  # the first round only warms up
        for chunks in ([block_size], [chunk, chunk]):
            if time.monotonic() > deadline:
                return timings
            measured = _run_request(executor, kv_cache, chunks, vocab_size, rng, deadline)
            timings += measured if round_ else []
    return timings


def _run_request(executor: Executor, kv_cache: KVCacheCoordinator, chunks: Sequence[int], vocab_size: int,
                 rng: random.Random, deadline: float) -> list[Timing]:
    """Compute a throwaway prompt in these chunks, one step each; time every step."""
    num_tokens = sum(chunks)
    block_ids = kv_cache.device.allocate_slots(_REQUEST_ID, num_tokens)
    if block_ids is None:
        return []
    prompt = tuple(rng.randrange(vocab_size) for _ in range(num_tokens))
    timings, computed = [], 0
    try:
        for count in chunks:
            if computed and time.monotonic() > deadline:
                break
            step = StepInput(0, num_scheduled_tokens={_REQUEST_ID: count}, **(
                {"cached_requests": (CachedRequestData(_REQUEST_ID, ((),), computed),)} if computed else
                {"new_requests": (NewRequestData(_REQUEST_ID, prompt, (), _GREEDY, (tuple(block_ids),), 0),)}))
            started = time.perf_counter()
            executor.execute(step)
            timings.append((((computed, count),), time.perf_counter() - started))
            computed += count
    finally:
        executor.execute(StepInput(0, finished_request_ids=frozenset({_REQUEST_ID})))
        kv_cache.device.free(_REQUEST_ID)
    return timings


def _transfer_timings(executor: Executor) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(host -> device loads, Redis -> host fetches) as (bytes, seconds)."""
    report = executor.execute(StepInput(0, kv_transfers=KVTransferOps(calibration_bytes=CALIBRATION_BYTES))).kv_report
    samples = report.transfers if report is not None else ()
    return ([(s.nbytes, s.seconds) for s in samples if s.path == HOST_TO_DEVICE],
            [(s.nbytes, s.seconds) for s in samples if s.path == REDIS_TO_HOST])
