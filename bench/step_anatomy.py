"""What one engine step costs by its make-up: decode alone, prompts alone, and prompts beside a
decoding batch (a "mixed" step), on the serve bench's shape (8B shape, 2 layers, blocks of 64,
every prompt a shared 32K-token prefix, cached, + 256 new tokens).

Why: served at 64 streams, a burst of prompts reaches the engine a few at a time and is prefilled
in mixed steps beside the decoding requests. On an H100 (session 14) such a step took 30 ms
against 8.3 for decode alone, while 64 prompts prefilled together cost 2.7 ms each: 35 mixed steps
cost ~600 ms more than direct's two prefill steps (docs/benchmarks.md). This drives LLMEngine.step
by hand, so each step's make-up is known, and reports each kind's median wall time with its
phases (schedule / execute / outputs, from the engine's own series), then one step of each kind
under torch.profiler: the top host and device ops, and the device's busy share of the step.

    python3 bench/step_anatomy.py                 # GPU (~1-2 min)
    python3 bench/step_anatomy.py --smoke         # CPU: tiny model, checks the script
    python3 bench/step_anatomy.py --host-kv-bytes 8589934592 --redis-url redis://127.0.0.1:6379   # tiers on

Prints a table and writes --out ($OUT/step_anatomy.json, else bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_model_cases import random_prompt  # noqa: E402
from model_shards.triton_compiles import TritonCompileLog, summarize  # noqa: E402

PHASES = ("schedule", "execute", "outputs")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-len", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[60],
                        help="requests decoding beside the prompts (a mixed step's decodes)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 16], help="prompts a step takes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--host-kv-bytes", type=int, default=0)
    parser.add_argument("--redis-url", action="append", default=[])
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="the interpreter's GIL switch interval (sys.setswitchinterval); default: the served "
                             "engine process's (serve.engine_switch_interval_s, 0.5 ms), not Python's 5 ms")
    parser.add_argument("--whole-eager-ab", action="store_true",
                        help="each mixed step also with model.mixed_step_graph_max_prompt_tokens 0 (the whole "
                             "step eager, as before session 17), in this process")
    parser.add_argument("--unfused-ab", action="store_true",
                        help="each prefill and mixed step also with the layers' torch elementwise ops instead of "
                             "the fused kernels (model.fused_layer_kernels off for the eager part; graphs keep theirs)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results"))
                                             / "step_anatomy.json"))
    return parser.parse_args()


def make_engine(args, model_dir: str):
    from cluster.config import CacheSettings, KVTierSettings, LongctxConfig, ModelSettings, SchedulerSettings
    from engine.llm_engine import LLMEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    return LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, device=device, dtype=dtype, max_model_len=args.prefix_len + 4096),
        cache=CacheSettings(block_size=64, num_device_blocks=None if device == "cuda" else 4096),
        scheduler=SchedulerSettings(max_num_seqs=max(64, max(args.decode_batches) + max(args.prompts))),
        kv_tiers=KVTierSettings(host_bytes=args.host_kv_bytes, redis_urls=tuple(args.redis_url)),
    ))


class StepDriver:
    """Adds requests and takes single steps of a known make-up on one engine."""

    def __init__(self, engine, prefix: list[int], new_tokens: int):
        from protocol.sampling_params import SamplingParams

        self.engine, self.prefix, self.new_tokens = engine, prefix, new_tokens
        self.params = SamplingParams(max_tokens=100_000, ignore_eos=True)  # aborted, never finished
        self._count = 0
        self.kv = {"kv_ms": 0.0, "saves": 0, "write_throughs": 0, "loads": 0, "probes": 0}
        self._time_kv_transfers(getattr(engine.executor, "worker", None))

    def _time_kv_transfers(self, worker) -> None:
        """Wrap the in-process worker's KV transfer step (the tiers' part of `execute`): its wall
        time on the step's thread and the moves it was given, per step."""
        if worker is None:
            return
        transfer = worker._transfer_kv

        def timed(step_input):
            ops, start = step_input.kv_transfers, time.perf_counter()
            try:
                return transfer(step_input)
            finally:
                self.kv["kv_ms"] += (time.perf_counter() - start) * 1e3
                for kind in ("saves", "write_throughs", "loads", "probes"):
                    self.kv[kind] += len(getattr(ops, kind, ()) or ())

        worker._transfer_kv = timed

    def add_prompts(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            self._count += 1
            prompt = self.prefix + random_prompt(self.new_tokens, 10_000 + self._count, self.engine.architecture.vocab_size)
            ids.append(f"anatomy-{self._count}")
            self.engine.add_request(ids[-1], prompt, self.params)
        return ids

    def start_decoding(self, count: int) -> list[str]:
        """`count` requests past their prefill (at the step budget: a few steps), decoding from here."""
        ids = self.add_prompts(count)
        while any(self.engine.scheduler.requests[i].num_computed_tokens < len(self.prefix) + self.new_tokens for i in ids):
            self.engine.step()
        return ids

    def timed_step(self) -> dict:
        before, kv_before = self._phase_seconds(), dict(self.kv)
        start = time.perf_counter()
        self.engine.step()
        wall = time.perf_counter() - start
        after = self._phase_seconds()
        return {"ms": wall * 1e3, **{phase: (after[phase] - before[phase]) * 1e3 for phase in PHASES},
                **{kind: self.kv[kind] - kv_before[kind] for kind in self.kv}}

    def abort(self, ids: list[str]) -> None:
        for request_id in ids:
            self.engine.abort_request(request_id)
        self.engine.step()  # the workers drop their state

    def _phase_seconds(self) -> dict[str, float]:
        registry = self.engine.step_metrics.registry
        return {phase: registry.get_sample_value("longctx_engine_step_phase_seconds_total", {"phase": phase})
                for phase in PHASES}  # fmt: skip


def measure(driver: StepDriver, decode_batch: int, prompts: int, repeats: int) -> list[dict]:
    """`repeats` steps of `prompts` new prompts beside `decode_batch` decoding requests (either may
    be 0). Repeat r lets the decoding requests make r tokens first, so each repeat's contexts are
    new lengths, as a served step's are: a kernel that compiles or plans per length shows here."""
    steps = []
    for repeat in range(repeats):
        decoding = driver.start_decoding(decode_batch) if decode_batch else []
        for _ in range(repeat if decode_batch else 0):
            driver.engine.step()
        new = driver.add_prompts(prompts)
        steps.append(driver.timed_step())
        driver.abort(decoding + new)
    return steps


def median_row(steps: list[dict]) -> dict:
    """Each figure's median over the steps, and the slowest step's wall time."""
    row = {key: round(statistics.median(step[key] for step in steps), 3) for key in steps[0]}
    return {**row, "max_ms": round(max(step["ms"] for step in steps), 3)}


def profile_step(driver: StepDriver, decode_batch: int, prompts: int) -> dict:
    """One step under torch.profiler: the top host ops and device kernels, the device's busy time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    decoding = driver.start_decoding(decode_batch) if decode_batch else []
    new = driver.add_prompts(prompts)
    with profile(activities=activities) as profiler:
        step = driver.timed_step()
    driver.abort(decoding + new)
    averages = profiler.key_averages()
    device_us = busy_us(profiler.events()) if torch.cuda.is_available() else 0.0
    top_host = sorted(averages, key=lambda event: -event.self_cpu_time_total)[:12]
    top_device = sorted(averages, key=lambda event: -event.self_device_time_total)[:12] if device_us else []
    return {
        "step_ms": round(step["ms"], 3),
        "device_busy_ms": round(device_us / 1e3, 3),
        "top_host_ops_ms": [(event.key[:80], event.count, round(event.self_cpu_time_total / 1e3, 3)) for event in top_host],
        "top_device_ops_ms": [(event.key[:80], event.count, round(event.self_device_time_total / 1e3, 3))
                              for event in top_device],
    }


def busy_us(events) -> float:
    """Microseconds in which some kernel or copy ran on the device: the union of their intervals.
    (A sum over key_averages counts each kernel twice, once as itself and once in its aten op's
    device time: session 16's "device busy" figures were about twice the real ones.)"""
    from torch.autograd import DeviceType

    intervals = sorted((event.time_range.start, event.time_range.end) for event in events
                       if event.device_type == DeviceType.CUDA)
    busy, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def python_profile(driver: StepDriver, decode_batch: int, prompts: int) -> list[tuple[str, int, float]]:
    """One step under cProfile: the Python functions with the most own time (cProfile slows Python
    down, so read the ranking, not the sums)."""
    import cProfile
    import pstats

    decoding = driver.start_decoding(decode_batch) if decode_batch else []
    new = driver.add_prompts(prompts)
    profiler = cProfile.Profile()
    profiler.runcall(driver.engine.step)
    driver.abort(decoding + new)
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive, own s, cumulative s, callers)}
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:15]
    return [(f"{Path(file).name}:{line}({function})", calls, round(own * 1e3, 3))
            for (file, line, function), (calls, _, own, _, _) in top]


Scenario = tuple[str, int, int, str]  # (name, decoding requests, new prompts, variant: "", "eager" or "unfused")


def profiled(rows: list[Scenario]) -> list[Scenario]:
    """Decode alone, one prompt alone, and one and (if measured) a few prompts beside a decode."""
    decode, prefills = rows[0], [r for r in rows if r[1] == 0]
    mixed = [r for r in rows if r[1] and r[2] and not r[3]]  # the default variant only
    return [decode, prefills[0], *mixed[:2]]


def scenarios(args) -> list[Scenario]:
    """Each step kind measured. With --whole-eager-ab each mixed step comes again with the whole
    step eager; with --unfused-ab each prefill and mixed step again with the torch elementwise ops."""
    rows = [(f"decode x{batch}", batch, 0, "") for batch in args.decode_batches]
    for count in args.prompts:
        rows.append((f"prefill {count}", 0, count, ""))
        if args.unfused_ab:
            rows.append((f"prefill {count}, unfused", 0, count, "unfused"))
    for batch in args.decode_batches:
        for count in args.prompts:
            rows.append((f"decode x{batch} + prefill {count}", batch, count, ""))
            variants = ["eager"] * args.whole_eager_ab + ["unfused"] * args.unfused_ab
            rows += [(f"decode x{batch} + prefill {count}, {variant}", batch, count, variant) for variant in variants]
    return rows


@contextmanager
def variant_of(driver: StepDriver, variant: str):
    """The step's variant while inside: "eager" (whole_eager), "unfused" (unfused_layers) or the default."""
    with whole_eager(driver, variant == "eager"), unfused_layers(driver, variant == "unfused"):
        yield


@contextmanager
def unfused_layers(driver: StepDriver, on: bool):
    """The in-process model's layers with torch's elementwise ops while `on` (norms, residual adds,
    RoPE, SiLU: model_shards/layer_kernels.py), as before session 18. Captured decode graphs keep
    the kernels they were captured with: this is the eager part's A/B."""
    worker = getattr(driver.engine.executor, "worker", None)
    modules = [(m, m.fused) for m in worker.model.modules() if hasattr(m, "fused")] if on and worker else []
    for module, _ in modules:
        module.fused = False
    try:
        yield
    finally:
        for module, fused in modules:
            module.fused = fused


@contextmanager
def whole_eager(driver: StepDriver, on: bool):
    """The in-process worker with model.mixed_step_graph_max_prompt_tokens 0 while `on`: a step
    that mixes decodes with prompts runs wholly eager (the path before session 17)."""
    worker = getattr(driver.engine.executor, "worker", None)
    if not on or worker is None:
        yield
        return
    config = worker.config
    worker.config = config.model_copy(update={"model": config.model.model_copy(
        update={"mixed_step_graph_max_prompt_tokens": 0})})
    try:
        yield
    finally:
        worker.config = config


def main() -> None:
    args = parse_args()
    from model_shards.make_model import make_model

    # How long a thread that wants the GIL waits for a holder that keeps it: as in the engine
    # process that serves (engine/engine_process.py), unless asked otherwise.
    if args.switch_interval_ms is None:
        from cluster.config import ServeSettings

        sys.setswitchinterval(ServeSettings().engine_switch_interval_s)
    else:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)

    if args.smoke:
        args.prefix_len, args.new_tokens, args.decode_batches, args.prompts, args.repeats = 512, 32, [4], [1, 2], 2
    preset = "tiny" if args.smoke else "llama3-8b-shape"
    overrides = {} if args.smoke else {"num_hidden_layers": args.layers}
    model_dir = str(make_model(Path(tempfile.mkdtemp(prefix="longctx-anatomy-")) / preset, preset, **overrides))
    engine = make_engine(args, model_dir)
    prefix = random_prompt(args.prefix_len, 1, engine.architecture.vocab_size)
    driver = StepDriver(engine, prefix, args.new_tokens)
    driver.abort(driver.start_decoding(1))  # the prefix is cached from here on; first-call costs paid
    with TritonCompileLog() as compiles:  # a compile here is one inside the first such request served
        first = measure(driver, args.decode_batches[-1], max(args.prompts), 1)[0]  # the mixed shapes' first calls
    first.update(summarize(compiles.take()))
    print(f"first mixed step (decode x{args.decode_batches[-1]} + prefill {max(args.prompts)}): {first['ms']:.2f} ms, "
          f"Triton compiles {first['triton_compiled']} ({first['triton_compile_s']} s)", flush=True)
    rows, profiles = {"first mixed step": {key: round(value, 3) if isinstance(value, float) else value
                                           for key, value in first.items()}}, {}
    for name, decode_batch, prompts, variant in scenarios(args):
        with variant_of(driver, variant):
            rows[name] = median_row(measure(driver, decode_batch, prompts, args.repeats))
        row = rows[name]
        print(f"{name:<35} step {row['ms']:8.2f} ms (max {row['max_ms']:8.2f})   schedule / execute / outputs "
              + " / ".join(f"{row[phase]:.2f}" for phase in PHASES) + f" ms; KV transfers {row['kv_ms']:.2f} ms "
              f"({row['saves']:g} saves, {row['write_throughs']:g} write-throughs, {row['loads']:g} loads)", flush=True)
    for name, decode_batch, prompts, _ in profiled(scenarios(args)):
        profiles[name] = {**profile_step(driver, decode_batch, prompts),
                          "python_ms": python_profile(driver, decode_batch, prompts)}  # fmt: skip
        report = profiles[name]
        print(f"\n{name}: step {report['step_ms']} ms, device busy {report['device_busy_ms']} ms")
        print("  host:   " + "; ".join(f"{key} x{count} {ms}" for key, count, ms in report["top_host_ops_ms"]))
        print("  device: " + "; ".join(f"{key} x{count} {ms}" for key, count, ms in report["top_device_ops_ms"]))
        print("  python (cProfile, own time): " + "; ".join(f"{key} x{count} {ms}" for key, count, ms in report["python_ms"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "steps_ms": rows, "profiles": profiles}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
