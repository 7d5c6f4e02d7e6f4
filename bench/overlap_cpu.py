"""scheduler.overlap_outputs on the CPU machine: the engine's text work beside a rank that computes
in a process of its own, so the host work and the "device" (the rank's core) really overlap.

A tiny model's steps take a few ms on a CPU core; the engine makes ~14 us of text a request a
step (bench/engine_cpu.py "host work a request"), so with many requests decoding the text is a
visible share of a step. Each row: `--requests` decoding requests of `--output-len` tokens through
`engine/offline.py generate` (the engine's `step(deliver)`), the rank in a child process
(LocalProcessExecutor over one rank) or in the engine's own (InProcessExecutor: CPU torch runs
synchronously, so nothing overlaps there and the two settings should tie). Alternating off / on,
`--repeats` runs each; the best run of each.

    python bench/overlap_cpu.py                      # ~1 min on 2 cores
    python bench/overlap_cpu.py --requests 128 --output-len 64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from report import print_table, write_json  # bench/ is on sys.path when a script runs


def make_config(model_dir: str, overlap: bool, num_requests: int):
    from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings

    return LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="float32", device="cpu"),
        cache=CacheSettings(block_size=16, num_device_blocks=4096),
        scheduler=SchedulerSettings(max_num_seqs=num_requests, overlap_outputs=overlap),
    )


def make_engine(model_dir: str, overlap: bool, num_requests: int, rank_in_process: bool):
    """An engine whose one rank computes in a child process (or in this one)."""
    from engine.llm_engine import LLMEngine
    from executors.local import InProcessExecutor, LocalProcessExecutor

    config = make_config(model_dir, overlap, num_requests)
    executor = InProcessExecutor(config) if rank_in_process else LocalProcessExecutor(config)
    return LLMEngine(config, executor=executor)


def timed_run(engine, num_requests: int, output_len: int, seed: int) -> dict:
    """Output tokens per second of one batch of distinct prompts decoded to `output_len`."""
    import random

    from engine.offline import generate
    from protocol.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 500) for _ in range(32)] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    before = _counters(engine.step_metrics)
    start = time.perf_counter()
    results = generate(engine, prompts, params)
    seconds = time.perf_counter() - start
    after = _counters(engine.step_metrics)
    steps = after["steps"] - before["steps"]
    tokens = sum(len(choices[0].token_ids) for choices in results)
    assert tokens == num_requests * output_len, tokens
    phases = {f"{phase} ms": round((after[phase] - before[phase]) * 1e3 / steps, 3) for phase in PHASES}
    return {"seconds": seconds, "tok_per_s": tokens / seconds, "ms_per_step": seconds * 1e3 / steps, **phases}


PHASES = ("schedule", "execute", "outputs")


def _counters(metrics) -> dict[str, float]:
    """Steps taken and seconds by phase so far (engine/step_metrics.py's counters)."""
    counters = {phase: metrics.phase_seconds.labels(phase)._value.get() for phase in PHASES}
    counters["steps"] = sum(metrics.steps.labels(kind)._value.get() for kind in ("prefill", "decode", "mixed"))
    return counters


def bench_rank_placement(model_dir: str, rank_in_process: bool, args) -> list[dict]:
    engines = {overlap: make_engine(model_dir, overlap, args.requests, rank_in_process) for overlap in (False, True)}
    runs: dict[bool, list[dict]] = {False: [], True: []}
    try:
        for overlap, engine in engines.items():
            timed_run(engine, args.requests, 4, seed=99)  # warm-up: first-call costs out of the timings
        for repeat in range(args.repeats):
            for overlap, engine in engines.items():
                runs[overlap].append(timed_run(engine, args.requests, args.output_len, seed=repeat))
    finally:
        for engine in engines.values():
            engine.shutdown()
    best = {overlap: max(r["tok_per_s"] for r in runs[overlap]) for overlap in runs}
    rows = []
    for overlap in (False, True):
        fastest = max(runs[overlap], key=lambda r: r["tok_per_s"])
        rows.append({
            "rank": "in process" if rank_in_process else "child process",
            "overlap_outputs": "on" if overlap else "off",
            "tok_per_s best": round(fastest["tok_per_s"]),
            "tok_per_s all": "/".join(str(round(r["tok_per_s"])) for r in runs[overlap]),
            "ms_per_step": round(fastest["ms_per_step"], 3),
            **{name: fastest[f"{name} ms"] for name in PHASES},
            "vs off": f"{(best[overlap] / best[False] - 1) * 100:+.1f}%",
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests decoding together")
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=1, help="the tiny model's layers (fewer: more host share)")
    args = parser.parse_args()
    from model_shards.make_model import make_model

    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(make_model(folder, "tiny", seed=1, num_hidden_layers=args.layers))
        rows = bench_rank_placement(model_dir, False, args) + bench_rank_placement(model_dir, True, args)
    print_table(f"overlapped outputs: {args.requests} requests x {args.output_len} tokens, tiny model, "
                f"{args.layers} layer(s), best of {args.repeats}", rows)
    write_json("overlap_cpu", {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                               "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
