"""CPU benchmarks of the engine's control plane (no GPU, no torch).

Run: `make bench-cpu` (or `python bench/engine_cpu.py`). Each `bench_*` function times one part,
prints a table and returns a JSON-able dict; `main` runs them all and writes
bench/results/engine_cpu.json.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

from report import print_table  # bench/ is on sys.path when a script runs

from cluster.config import SchedulerSettings
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from kvcache.block_hash import hash_full_blocks, root_hash
from kvcache.coordinator import KVCacheCoordinator
from kvcache.kv_cache_manager import KVCacheManager
from protocol.sampling_params import SamplingParams
from protocol.step import SampledToken, StepOutput

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "engine_cpu.json"
VOCAB_SIZE = 152_064  # Qwen2-sized vocabulary: token ids well above 2**16


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fastest of `repeats` runs, in seconds: the least disturbed by other processes."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return min(timings)


def bench_prefix_hashing(
    num_tokens: int = 1_000_000, block_sizes: tuple[int, ...] = (16, 64, 256), repeats: int = 5
) -> dict:
    """Chained block hashes of a whole 1M-token prompt, from a Python list of token ids."""
    rng = random.Random(0)
    token_ids = [rng.randrange(VOCAB_SIZE) for _ in range(num_tokens)]
    root = root_hash("bench-model|bf16|block-hash-bench")
    rows = []
    for block_size in block_sizes:
        seconds = best_of(repeats, lambda: hash_full_blocks(token_ids, block_size, root))
        rows.append(
            {
                "tokens": num_tokens,
                "block_size": block_size,
                "ms": round(seconds * 1e3, 2),
                "ns_per_token": round(seconds * 1e9 / num_tokens, 1),
            }
        )
    print_table(f"prefix hashing (hash_full_blocks, best of {repeats})", rows)
    return {"repeats": repeats, "rows": rows}


def _answer_step(scheduler: Scheduler, step) -> StepOutput:
    """What a worker would return: a token for each request whose chunk reached its end."""
    sampled = {}
    for request_id, num_tokens in step.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        if request.num_computed_tokens + num_tokens == request.num_tokens:
            sampled[request_id] = SampledToken(11)
    return StepOutput(step.step_id, sampled)


def _time_steps(scheduler: Scheduler, num_steps: int) -> list[float]:
    """Seconds per schedule() + update_from_output(), i.e. the control plane's share of a step."""
    timings = []
    for _ in range(num_steps):
        start = time.perf_counter()
        step = scheduler.schedule()
        scheduler.update_from_output(step, _answer_step(scheduler, step))
        timings.append(time.perf_counter() - start)
    return timings


def _scheduler_with(requests: list[Request], num_blocks: int, budget: int) -> Scheduler:
    settings = SchedulerSettings(max_num_seqs=512, max_tokens_per_step=budget, max_waiting_requests=4096)
    scheduler = Scheduler(settings, KVCacheCoordinator(KVCacheManager(num_blocks, requests[0].block_size)))
    for request in requests:
        scheduler.add_request(request)
    return scheduler


def bench_scheduler_step(block_size: int = 64, num_steps: int = 200) -> dict:
    """Step time with 256 decoding sequences, and with one 1M-token prompt being prefilled."""
    rng = random.Random(0)
    root = root_hash("bench-model")
    params = SamplingParams(max_tokens=1_000_000)
    decodes = [
        Request(f"d{i}", [rng.randrange(VOCAB_SIZE) for _ in range(2000)], params, root, block_size)
        for i in range(256)
    ]
    decode_scheduler = _scheduler_with(decodes, num_blocks=256 * 2000 // block_size + 2048, budget=8192)
    while decode_scheduler.waiting or any(r.num_uncomputed_tokens > 1 for r in decode_scheduler.running):
        _time_steps(decode_scheduler, 1)  # prefill everything first
    long_prompt = [rng.randrange(VOCAB_SIZE) for _ in range(1_000_000)]
    long_request = Request("long", long_prompt, params, root, block_size)
    long_scheduler = _scheduler_with([long_request], num_blocks=1_000_000 // block_size + 64, budget=8192)
    rows = []
    for name, scheduler in (("256 decoding sequences", decode_scheduler), ("one 1M-token prefill", long_scheduler)):
        timings = sorted(_time_steps(scheduler, num_steps))
        rows.append({"case": name, "block_size": block_size, "p50_ms": round(timings[len(timings) // 2] * 1e3, 3),
                     "p99_ms": round(timings[int(len(timings) * 0.99) - 1] * 1e3, 3), "goal_ms": 1.0})
    print_table(f"scheduler step, control plane only ({num_steps} steps)", rows)
    return {"rows": rows}


def bench_short_behind_long(block_size: int = 64, budget: int = 16384) -> dict:
    """Steps until a 2K-token request's first token when it arrives one step into a 1M-token
    prefill, and the long prompt's own steps to its first token: first come, first served
    (share 1) against the default share of the budget for a shorter waiting request."""
    rng = random.Random(1)
    root = root_hash("bench-model")
    long_prompt = [rng.randrange(VOCAB_SIZE) for _ in range(1_000_000)]
    short_prompt = [rng.randrange(VOCAB_SIZE) for _ in range(2000)]
    rows = []
    for share in (1.0, SchedulerSettings().prefill_share_while_waiting):
        settings = SchedulerSettings(max_tokens_per_step=budget, prefill_share_while_waiting=share)
        scheduler = Scheduler(settings, KVCacheCoordinator(KVCacheManager(1_004_000 // block_size + 64, block_size)))
        scheduler.add_request(Request("long", long_prompt, SamplingParams(max_tokens=4), root, block_size))
        _time_steps(scheduler, 1)
        scheduler.add_request(Request("short", short_prompt, SamplingParams(max_tokens=4), root, block_size))
        first_token = {}
        for step in range(2, 200):
            _time_steps(scheduler, 1)
            for name in ("long", "short"):
                request = scheduler.requests.get(name)
                if name not in first_token and request is not None and request.num_output_tokens > 0:
                    first_token[name] = step
                    scheduler.finish_request(name, RequestStatus.FINISHED_STOPPED)  # one token is all it asks
            if len(first_token) == 2:
                break
        rows.append({"prefill_share_while_waiting": share, "short: steps to first token": first_token["short"] - 1,
                     "long: steps to first token": first_token["long"]})
    print_table(f"a 2K request one step into a 1M prefill ({budget}-token steps)", rows)
    return {"rows": rows}


def bench_per_request_host_work(num_blocks: int = 516, num_running: int = 64, repeats: int = 200) -> dict:
    """Host work a request costs at admission and at each step (session 18): a 33K-token prompt's
    cached prefix found, retained and released (516 blocks of 64), the prefill progress log over
    64 requests past their prefill, and a request's stop-string matcher without stop strings."""
    from types import SimpleNamespace

    from engine.progress import PrefillProgressLog
    from engine.stop_strings import StopStringMatcher
    from kvcache.block_pool import BlockPool

    pool = BlockPool(8 * num_blocks)
    hashes = [index.to_bytes(8, "little") for index in range(num_blocks)]
    for block_id, block_hash in zip(pool.allocate(num_blocks), hashes):
        pool.mark_cached(block_id, block_hash)
    pool.release(list(range(num_blocks - 1, -1, -1)))

    def admit_and_free() -> None:
        found = pool.lookup_run(hashes)
        pool.retain(found)
        pool.release(found[::-1])

    running = [SimpleNamespace(request_id=f"r{i}", num_computed_tokens=33_000 + i, num_prompt_tokens=33_000)
               for i in range(num_running)]
    progress, matcher = PrefillProgressLog(), StopStringMatcher(())
    progress.observe(running)
    rows = [
        {"work": f"lookup + retain + release of {num_blocks} cached blocks", "us": best_of(repeats, admit_and_free) * 1e6},
        {"work": f"prefill progress over {num_running} running requests", "us": best_of(repeats, lambda: progress.observe(running)) * 1e6},
        {"work": "stop-string matcher, no stop strings, 1,000 tokens",
         "us": best_of(repeats, lambda: [matcher.feed(" word") for _ in range(1000)]) * 1e6},
    ]
    for row in rows:
        row["us"] = round(row["us"], 1)
    print_table(f"host work a request, at admission and a step (best of {repeats})", rows)
    return {"repeats": repeats, "rows": rows}


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    results = {
        "machine": machine_info(),
        "prefix_hashing": bench_prefix_hashing(),
        "scheduler_step": [bench_scheduler_step(block_size) for block_size in (16, 64, 256)],
        "short_behind_long": bench_short_behind_long(),
        "per_request_host_work": bench_per_request_host_work(),
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
