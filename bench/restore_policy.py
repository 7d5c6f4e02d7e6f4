"""Does the cost policy's TTFT stay within 5% of the faster of restoring a cached prefix from Redis
and recomputing it, at every context length?

Three long-lived engines share one redis-server, like replicas of one deployment:
  writer  tiers on, restore_policy=never: prefills each document cold and writes its blocks
          through to Redis. Its TTFT is the *recompute* reference (tiers on: an engine that
          decides to recompute pays the same write-through; never: it sends no probe, so a
          policy that probes and then recomputes pays that round trip against it. Session 3's
          writer was `always` and paid a probe, which flattered the policy at 4K: 0.78).
  always  restore_policy=always: restores each document from Redis, all of it: the *restore*
          reference.
  cost    restore_policy=cost, calibrated at start-up (engine/calibration.py): decides, possibly
          recomputing a head while the rest is fetched. Its TTFT against the faster reference is
          the goal (`policy_vs_faster` <= 1.05).
Context lengths run shortest first, so the cost engine meets each one with the estimates the
shorter ones corrected (as a server that has been running). Each length runs on --repeats fresh
documents (twice as many up to 16K, one beyond 64K); each column keeps its fastest run, and
`doc_ratios` gives every document's policy TTFT over the faster of its own two references (a
wrong decision on one document shows there even when another document's was right). Every
decision is logged with its estimates (kvcache.tier_manager), and the calibration's raw prefill
requests (engine.calibration).

GPU: Llama-3-8B's shape with --ttft-layers (2) of its 32 layers: per layer the same attention and
KV per token, so recompute and restore both shrink 16x against the whole model, while fixed costs
(a step, a prefetch's round trips) do not: those weigh 16x more here. A length whose prefill or
restore runs out of memory is reported as such, and the longer ones are skipped.

GPU:  source .gpu/install.sh && PYTHONPATH=$PWD:$PYTHONPATH python3 bench/restore_policy.py --device cuda
CPU:  python bench/restore_policy.py   (a tiny model, short contexts: checks the script, not speed)
Writes $OUT/restore_policy_<device>.json (or bench/results/).
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import statistics
import sys
import tempfile

import torch
from redis_ceilings import start_redis, stop_redis
from report import print_table, write_json  # bench/ is on sys.path when a script runs
from tier_engines import engine_for, make_ttft_model, release, settle, ttft_row

from kvcache.tiers.host_index import REDIS

GOAL = 1.05  # the policy's TTFT against the faster reference


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="context lengths (default 4K 16K 64K 256K 1M on GPU, 1K 4K 8K on CPU)")
    parser.add_argument("--ttft-layers", type=int, default=2, help="GPU model: Llama-3-8B shape, this many layers")
    parser.add_argument("--repeats", type=int, default=3, help="documents per length up to 64K (up to 16K: twice; longer: 1)")
    parser.add_argument("--max-tokens-per-step", type=int, default=None, help="prefill chunk (default 8192 on GPU)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.contexts = sorted(args.contexts or ([4096, 16384, 65536, 262144, 1 << 20] if cuda else [1024, 4096, 8192]))
    args.model_dtype = "bfloat16" if cuda else "float32"
    args.ttft_block_size = 64
    args.max_tokens_per_step = args.max_tokens_per_step or (8192 if cuda else 1024)
    return args


class Replicas:
    """The writer, always and cost engines, sized for the longest document."""

    def __init__(self, args, model_dir: str, url: str):
        self.block_size = args.ttft_block_size
        num_blocks = -(-max(args.contexts) // self.block_size) + 16
        block_nbytes = self._block_nbytes(args, model_dir)
        tiers = {"host_bytes": num_blocks * block_nbytes}
        self.writer = engine_for(args, model_dir, num_blocks, url, restore_policy="never", **tiers)
        self.always = engine_for(args, model_dir, num_blocks, url, restore_policy="always", **tiers)
        self.cost = engine_for(args, model_dir, num_blocks, url, restore_policy="cost", **tiers)
        self.calibrated = self.cost_model.describe()

    @staticmethod
    def _block_nbytes(args, model_dir: str) -> int:
        probe = engine_for(args, model_dir, 16, None)
        block_nbytes = probe.executor.kv_block_nbytes
        release(probe)
        return block_nbytes

    @property
    def cost_model(self):
        return self.cost.kv_cache.tiers.cost

    def release(self) -> None:
        for engine in (self.writer, self.always, self.cost):
            release(engine)


def decisions(engine) -> dict[str, float]:
    registry = engine.kv_cache.metrics.registry
    return {d: registry.get_sample_value("longctx_kv_restore_decisions_total", {"tier": REDIS, "decision": d}) or 0
            for d in ("restore", "recompute")}


def measured_ttft(scenario: str, engine, doc: list[int]) -> dict:
    """One TTFT, after a garbage collection: none triggered by the other engines' garbage lands in
    this one (the three share the process; a 16K TTFT is ~60 ms)."""
    gc.collect()
    return ttft_row(scenario, engine, doc)


def run_document(replicas: Replicas, doc: list[int]) -> dict:
    """The three TTFTs of one new document, and what the cost engine estimated and chose."""
    recompute = measured_ttft("recompute", replicas.writer, doc)
    settle(replicas.writer)  # every block in Redis before another replica asks
    restore = measured_ttft("restore", replicas.always, doc)
    eligible = (len(doc) - 1) // replicas.block_size
    estimate = replicas.cost_model.decide(REDIS, 0, eligible)  # what admission will ask first
    before = decisions(replicas.cost)
    policy = measured_ttft("cost", replicas.cost, doc)
    settle(replicas.cost)
    after = decisions(replicas.cost)
    last_tokens = len(doc) - eligible * replicas.block_size
    faster_s = min(recompute["ttft_s"], restore["ttft_s"])
    return {"recompute_s": recompute["ttft_s"], "restore_s": restore["ttft_s"], "policy_s": policy["ttft_s"],
            "doc_ratio": round(policy["ttft_s"] / faster_s, 3),
            "decision": "restore" if after["restore"] > before["restore"] else "recompute",
            "head_tokens": policy["computed_tokens"] - last_tokens if policy["redis_hit_tokens"] else 0,
            "redis_hit_tokens": policy["redis_hit_tokens"], "est_restore_s": round(estimate.restore_s, 4),
            "est_recompute_s": round(estimate.recompute_s, 4)}


def bench_length(args, replicas: Replicas, rng: random.Random, vocab: int, length: int) -> dict:
    runs = [run_document(replicas, [rng.randrange(10, vocab) for _ in range(length)])
            for _ in range(documents_at(args, length))]
    best = {key: min(run[key] for run in runs) for key in ("recompute_s", "restore_s", "policy_s")}
    chosen = min(runs, key=lambda run: run["policy_s"])
    faster = min(best["recompute_s"], best["restore_s"])
    return {"context_tokens": length, **best, "faster": "restore" if best["restore_s"] < best["recompute_s"] else
            "recompute", "policy_vs_faster": round(best["policy_s"] / faster, 3),
            "within_goal": best["policy_s"] <= GOAL * faster,
            "decisions": "/".join(run["decision"] + (f"({run['head_tokens']})" if run["head_tokens"] else "")
                                  for run in runs),
            "doc_ratios": "/".join(str(run["doc_ratio"]) for run in runs),
            "median_doc_ratio": round(statistics.median(run["doc_ratio"] for run in runs), 3),
            **{key: chosen[key] for key in ("head_tokens", "redis_hit_tokens", "est_restore_s", "est_recompute_s")},
            "runs": runs, "estimates_after": replicas.cost_model.describe()}


def documents_at(args, length: int) -> int:
    """--repeats documents up to 64K, twice as many up to 16K (TTFTs of 10-60 ms vary ~10% from one
    document to the next: the fastest of more is steadier), one beyond."""
    return 2 * args.repeats if length <= 16384 else args.repeats if length <= 65536 else 1


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error)


def run_lengths(args, replicas: Replicas, vocab: int, results: dict) -> list[dict]:
    """Every length, shortest first; the JSON is rewritten after each (a run cut short keeps them)."""
    rng, rows = random.Random(2), results.setdefault("rows", [])
    for length in args.contexts:
        try:
            rows.append(bench_length(args, replicas, rng, vocab, length))
        except Exception as error:  # noqa: BLE001 - only running out of memory is expected
            if not out_of_memory(error):
                raise
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            rows.append({"context_tokens": length, "faster": f"out of memory: {str(error).splitlines()[0][:80]}"})
            break  # an engine that ran out of memory mid-step is not trusted further
        print_table(f"restore or recompute at {length} tokens", [_columns(rows[-1])])
        print(f"estimates after {length} tokens: {rows[-1].get('estimates_after', '')}", flush=True)
        write_json(results_name(args), results)
    return rows


def results_name(args) -> str:
    return f"restore_policy_{'cuda' if args.device.startswith('cuda') else 'cpu'}"


def log_decisions() -> None:
    """Each restore decision with its estimates, and the calibration's raw timings, on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(relativeCreated)9.0f ms %(name)s: %(message)s"))
    for name, level in (("kvcache.tier_manager", logging.INFO), ("engine.calibration", logging.DEBUG)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)


def main() -> None:
    args = parse_args()
    log_decisions()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    layers = f"Llama-3-8B shape, {args.ttft_layers} of 32 layers" if device.type == "cuda" else "tiny model"
    results: dict = {"device": name, "model": layers, "block_size": args.ttft_block_size,
                     "max_tokens_per_step": args.max_tokens_per_step, "goal": GOAL}
    with tempfile.TemporaryDirectory() as folder:
        servers = [start_redis(folder)]
        try:
            model_dir, vocab = make_ttft_model(args, folder, max(args.contexts))
            replicas = Replicas(args, model_dir, f"redis://127.0.0.1:{servers[0][1]}")
            gc.freeze()  # the engines' long-lived objects: later collections do not walk them
            results["calibrated"] = replicas.calibrated
            run_lengths(args, replicas, vocab, results)
            results["estimates_at_end"] = replicas.cost_model.describe()
            replicas.release()
        finally:
            stop_redis(servers)
    print(f"cost engine, calibrated at start-up: {results['calibrated']}")
    print(f"cost engine, at the end:             {results['estimates_at_end']}")
    print_table(f"Restore from Redis or recompute: the policy against the faster ({name}, {layers}; "
                f"goal: within {GOAL - 1:.0%})", [_columns(row) for row in results["rows"]])
    write_json(results_name(args), results)


def _columns(row: dict) -> dict:
    """Every row with every column (an out-of-memory row has few)."""
    keys = ("context_tokens", "recompute_s", "restore_s", "faster", "policy_s", "policy_vs_faster", "within_goal",
            "decisions", "doc_ratios", "median_doc_ratio", "est_restore_s", "est_recompute_s")
    return {key: row.get(key, "") for key in keys}


if __name__ == "__main__":
    main()
