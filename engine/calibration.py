"""Start-up calibration of the restore-or-recompute estimates: a short probe of this machine.

Before the first request the engine times, on its own workers:

  prefill    throwaway requests of random tokens, never cached: one block, a quarter, half
             and a whole chunk, then two and three full chunks, the shape serving computes long
             prompts in (the single steps separate a step's fixed cost from the weights; one
             chunk vs. two the extra of a chunk with context; two vs. three attention). Each
             request is timed as a whole, up to its sampled token: a step that samples nothing
             returns once its kernels are queued (session 5's H200: an 8K first chunk "took"
             4.8 ms, the third 108 ms), so single steps of a long request time nothing useful.
             On the H200 a probe of one block and two chunks could not tell these apart: it
             put the weights at zero cost and attention at 1/4 of its rate, and the estimate
             was 3.5x low at 16K tokens and 3.7x high at 256K. Each request shape is run once
             untimed first (first calls of a shape pay for kernel plans, ~70 ms each with
             cuDNN, and allocations);
  transfers  one block and up to CALIBRATION_BYTES each way between device and host memory,
             and host <-> Redis under throwaway keys deleted after (KVTransfer.calibrate);
  round trips  with Redis on: a prefetch of throwaway keys through the executor, as the driver
             runs one: a probe sent in one engine step and polled for in the next ones, then a
             fetch (a miss) sent and polled for the same way (twice, the second timed). The
             worker's fetch timings lack these steps;

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
import os
import random
import time
from collections.abc import Sequence

from cluster.config import LongctxConfig
from executors import Executor
from kvcache.coordinator import KVCacheCoordinator
from kvcache.tier_manager import IDLE_POLL_S
from protocol.kv_transfer_ops import HOST_TO_DEVICE, REDIS_TO_HOST, KVTransferOps
from protocol.sampling_params import SamplingParams
from protocol.step import CachedRequestData, NewRequestData, StepInput

logger = logging.getLogger(__name__)

CALIBRATION_BYTES = 256 << 20  # per path: enough that a transfer's bytes outweigh its fixed cost
_REQUEST_ID = "longctx-calibration"
_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)  # draws nothing from the workers' RNG
_FULL_CHUNKS = 3  # the long request of the prefill probe
_PROBE_ID = -1  # the driver's own probe ids count from 0
_FETCH_SLOT = 0  # a missing key's fetch leaves its host slot as it was; nothing uses slots yet
_ROUND_TRIP_LIMIT_S = 1.0  # a probe not answered by then: no round trip measured

Steps = tuple[tuple[tuple[int, int], ...], ...]  # per step, (first position, tokens) of each chunk
Timing = tuple[Steps, float]  # one request's steps, seconds up to its sampled token


def calibrate_restore_estimates(config: LongctxConfig, executor: Executor, kv_cache: KVCacheCoordinator,
                                vocab_size: int, max_model_len: int) -> None:
    """Probe prefill and transfers and hand the timings to the cost model (see the module doc);
    nothing when the cost policy has no tiers to decide about or no budget."""
    tiers = kv_cache.tiers
    budget_s = config.kv_tiers.calibration_budget_s
    if tiers.host is None or tiers.cost.policy != "cost" or budget_s <= 0 or kv_cache.extra_groups:
        return  # (a hybrid model's estimates start from the defaults and learn from its steps)
    start = time.monotonic()
    # With write-through each chunk's blocks are saved to host at the start of the next step,
    # which waits for the chunk: part of what recomputing costs, so part of the probe.
    save_slots = range(tiers.host.num_slots) if tiers.redis_enabled and config.kv_tiers.redis_write_through else ()
    prefills = _prefill_timings(executor, kv_cache, config.scheduler.max_tokens_per_step, vocab_size, max_model_len,
                                save_slots, deadline=start + budget_s)
    loads, fetches = _transfer_timings(executor)
    round_trips_s = _prefetch_round_trips_seconds(executor) if tiers.redis_enabled else 0.0
    tiers.cost.calibrate(prefills, loads, fetches, round_trips_s, saves_chunks=bool(save_slots))
    logger.info("restore estimates calibrated in %.2f s (%d prefills, %d transfers, a prefetch's round trips "
                "%.2f ms): %s", time.monotonic() - start, len(prefills), len(loads) + len(fetches), round_trips_s * 1e3,
                tiers.cost.describe())
    logger.debug("calibration prefills (steps of spans, seconds): %s", prefills)


def _prefill_timings(executor: Executor, kv_cache: KVCacheCoordinator, budget_tokens: int, vocab_size: int,
                     max_model_len: int, save_slots: Sequence[int], deadline: float) -> list[Timing]:
    block_size = kv_cache.block_size
    # The full chunks must fit the device and the positions the model knows.
    room = min(kv_cache.num_blocks * block_size, max_model_len - 1) // _FULL_CHUNKS
    chunk = min(budget_tokens, room) // block_size * block_size
    if chunk < block_size:
        return []
    parts = sorted({max(block_size, chunk // d // block_size * block_size) for d in (4, 2)} - {chunk})
    shapes = [[block_size], *([part] for part in parts), *([chunk] * n for n in range(1, _FULL_CHUNKS + 1))]
    rng = random.Random(0)
    timings: list[Timing] = []
    for timed in (False, True):  # the first round only warms up: each shape once
        for chunks in shapes:
            if time.monotonic() > deadline:
                return timings
            measured = _run_request(executor, kv_cache, chunks, vocab_size, rng, save_slots, deadline)
            timings += [measured] if timed and measured is not None else []
    return timings


def _run_request(executor: Executor, kv_cache: KVCacheCoordinator, chunks: Sequence[int], vocab_size: int,
                 rng: random.Random, save_slots: Sequence[int], deadline: float) -> Timing | None:
    """Compute a throwaway prompt in these chunks, one step each, and time them together; None if
    it did not get to its last chunk in time (its device work is then not all waited for). Each
    step after the first saves the blocks of the chunk before into `save_slots` (scratch: no
    slot is in use before the first request), as write-through does."""
    num_tokens, block_size = sum(chunks), kv_cache.block_size
    block_ids = kv_cache.device.allocate_slots(_REQUEST_ID, num_tokens)
    if block_ids is None:
        return None
    prompt = tuple(rng.randrange(vocab_size) for _ in range(num_tokens))
    steps, seconds, computed = [], 0.0, 0
    try:
        for count in chunks:
            if computed and time.monotonic() > deadline:
                return None
            saved = block_ids[(computed - steps[-1][0][1]) // block_size:computed // block_size] if computed else []
            saves = KVTransferOps(saves=tuple(zip(saved, save_slots))) if saved and save_slots else None
            step = StepInput(0, num_scheduled_tokens={_REQUEST_ID: count}, kv_transfers=saves, **(
                {"cached_requests": (CachedRequestData(_REQUEST_ID, ((),), computed),)} if computed else
                {"new_requests": (NewRequestData(_REQUEST_ID, prompt, (), _GREEDY, (tuple(block_ids),), 0),)}))
            started = time.perf_counter()
            executor.execute(step)
            seconds += time.perf_counter() - started
            steps.append(((computed, count),))
            computed += count
    finally:
        executor.execute(StepInput(0, finished_request_ids=frozenset({_REQUEST_ID})))
        kv_cache.device.free(_REQUEST_ID)
    return tuple(steps), seconds


def _transfer_timings(executor: Executor) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(host -> device loads, Redis -> host fetches) as (bytes, seconds)."""
    report = executor.execute(StepInput(0, kv_transfers=KVTransferOps(calibration_bytes=CALIBRATION_BYTES))).kv_report
    samples = report.transfers if report is not None else ()
    return ([(s.nbytes, s.seconds) for s in samples if s.path == HOST_TO_DEVICE],
            [(s.nbytes, s.seconds) for s in samples if s.path == REDIS_TO_HOST])


def _prefetch_round_trips_seconds(executor: Executor) -> float:
    """A prefetch of nothing as the driver sees it: a probe of throwaway keys out in one step,
    polled for in the next ones, then a fetch of one of them (a miss: nothing is moved or stored)
    sent and polled for the same way. 0.0 if an answer did not come within _ROUND_TRIP_LIMIT_S.
    Twice: the first pays for connecting."""
    seconds = 0.0
    for _ in range(2):
        hashes = tuple(os.urandom(32) for _ in range(16))
        start = time.perf_counter()
        probe = KVTransferOps(probes=((_PROBE_ID, hashes),))
        fetch = KVTransferOps(fetches=((hashes[0], _FETCH_SLOT),))
        for ops, answered in ((probe, _probed), (fetch, _fetched)):
            if not _poll(executor, ops, answered, start + _ROUND_TRIP_LIMIT_S):
                return 0.0
        seconds = time.perf_counter() - start
    return seconds


def _poll(executor: Executor, ops: KVTransferOps, answered, deadline: float) -> bool:
    """Send `ops` in one step, then idle steps until `answered(report)`; False past the deadline."""
    report = executor.execute(StepInput(0, kv_transfers=ops)).kv_report
    while not answered(report):
        if time.perf_counter() > deadline:
            return False
        report = executor.execute(StepInput(0, kv_transfers=KVTransferOps(poll_timeout_s=IDLE_POLL_S))).kv_report
    return True


def _probed(report) -> bool:
    return report is not None and any(probe_id == _PROBE_ID for probe_id, _ in report.probed)


def _fetched(report) -> bool:
    return report is not None and any(slot == _FETCH_SLOT for slot, _ in report.fetched)
