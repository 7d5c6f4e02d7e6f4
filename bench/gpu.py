"""The GPU fast path in one device call: prefill, decode and correctness against their ceilings,
raw cuDNN SDPA and Hugging Face transformers, on an 8B-shaped model with few layers.

    source .gpu/install.sh >/dev/null && python3 bench/gpu.py 2>&1 | tee $OUT/gpu.log
    python3 bench/gpu.py --smoke    # on a CPU: tiny sizes, checks the script itself

Ceilings are measured in the same run: the bf16 matmul rate (MFU's denominator) and the
device-to-device copy rate (bytes read + written; paged decode is held to its KV bytes read).
Figures per layer scale to the 32-layer model (its layers are identical); whole-model figures
are for the `--layers` model, embedding and LM head included. Each size is tried on its own:
out of memory or out of time there, the run goes on. Writes gpu.json under $OUT (or
bench/results/) and prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import gpu_cases as cases  # noqa: E402
from bench import gpu_model_cases as model_cases  # noqa: E402
from bench.gpu_report import print_report  # noqa: E402

LENGTHS = [8192, 32768, 131072, 524288, 1048576]
# bf16 logits over the last positions against float32 dense attention: bf16 keeps 8 mantissa bits,
# so each layer's activations carry ~0.4% rounding; 3% relative L2 error over two layers is a loose
# bound (a wrong mask or head mapping gives O(1)); the argmax may flip only between near-ties.
LOGIT_TOLERANCE = {"relative_error": 3e-2, "top1_agreement": 0.9}


class Deadline:
    """The run's time budget: a case that would not finish in what is left is skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def allows(self, estimate_s: float) -> bool:
        return time.monotonic() + estimate_s < self.end


def attempt(name: str, deadline: Deadline, estimate_s: float, fn, *args) -> dict:
    """fn(*args), or why not: out of time, out of memory, or the error's last line."""
    if not deadline.allows(estimate_s):
        print(f"  {name}: skipped (time budget)", flush=True)
        return {"skipped": "time budget"}
    start = time.perf_counter()
    try:
        result = fn(*args)
    except torch.OutOfMemoryError:
        result = {"error": "out of memory"}
    except Exception as error:  # noqa: BLE001 - reported, and the run goes on
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    cases.free_memory()
    if isinstance(result, dict):
        result["wall_s"] = round(time.perf_counter() - start, 2)
    print(f"  {name}: {result}", flush=True)
    return result


def attention_estimate_s(tokens: int) -> float:
    return cases.causal_attention_flops(tokens) / 3e14  # one layer at ~300 TFLOP/s, with margin


def kernel_sections(args, device: torch.device, deadline: Deadline) -> dict:
    print("ceilings, kernel correctness, decode kernels", flush=True)
    report = {"matmul": attempt("matmul", deadline, 5, cases.matmul_ceiling, device, args.matmul_size),
              "copy": attempt("copy", deadline, 5, cases.copy_ceiling, device, args.copy_gib),
              "triton_vs_reference": attempt("triton vs reference", deadline, 30, cases.triton_vs_reference, device,
                                             args.check_tokens, args.check_shapes)}
    report["decode_kernel"] = {}
    for tokens in args.lengths:
        report["decode_kernel"][tokens] = {
            batch: attempt(f"paged decode {tokens} x {batch}", deadline, 5, cases.paged_decode_rate, batch, tokens,
                           args.block_size, device, args.repeats)
            for batch in args.batches if batch * tokens * 4096 < args.decode_kv_bytes_max}
    return report


def sweep_section(args, device: torch.device, deadline: Deadline) -> dict:
    print("paged decode plans (split cap, smallest split, tile, warps, stages) per case", flush=True)
    plans = cases.sweep_plans()[:args.sweep_plans]
    return {"decode_sweep": attempt("decode sweep", deadline, 60, cases.decode_sweep, device, args.sweep_cases,
                                    args.block_size, plans, min(10, args.repeats))}


def attention_section(args, device: torch.device, deadline: Deadline) -> dict:
    print("prefill attention against raw cuDNN", flush=True)
    report = {"attention": {}}
    for tokens in args.lengths:
        estimate = attention_estimate_s(tokens)
        report["attention"][tokens] = {
            "raw": attempt(f"raw SDPA {tokens}", deadline, 2 * estimate, cases.raw_sdpa, tokens, device),
            "ours": attempt(f"chunked prefill attention {tokens}", deadline, 2 * estimate,
                            cases.chunked_prefill_attention, tokens, args.step_tokens, args.block_size, device)}
    sweep_tokens = min(131072, max(args.lengths))
    report["step_sweep"] = {"tokens": sweep_tokens, "rows": {
        step: attempt(f"chunked prefill attention {sweep_tokens} in {step}-token steps", deadline,
                      2 * attention_estimate_s(sweep_tokens), cases.chunked_prefill_attention, sweep_tokens, step,
                      args.block_size, device)
        for step in args.step_sweep}}
    return report


def engine_section(args, model_dir: str, device: torch.device, deadline: Deadline) -> dict:
    print("the engine with its defaults", flush=True)
    engine = model_cases.make_engine(model_dir, device, args.max_model_len)
    rows = {}
    try:
        model_cases.engine_single(engine, 512, 4)  # warm-up: kernels, cuDNN plans of small shapes
        for tokens in [t for t in args.lengths if t <= args.engine_max_tokens]:
            estimate = args.layers * 2 * attention_estimate_s(tokens) + 5
            single = attempt(f"engine {tokens}", deadline, estimate, model_cases.engine_single, engine, tokens)
            batched = {}
            if "error" not in single and "skipped" not in single:
                batched = attempt(f"engine batch {args.batches[-1]} over {tokens}", deadline, 10,
                                  model_cases.engine_batch_decode, engine, tokens, args.batches[-1])
            rows[tokens] = {"single": single, "batch": batched}
    finally:
        engine.shutdown()
        del engine
        cases.free_memory()
    return rows


def hf_section(args, model_dir: str, device: torch.device, deadline: Deadline) -> dict:
    print("transformers (sdpa), the same folder and prompts", flush=True)
    model = model_cases.load_hf(model_dir, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = {}
    for tokens in [t for t in args.lengths if t <= args.hf_max_tokens]:
        output_tokens = 32 if tokens <= 131072 else 0  # longer: TTFT only (a second prefill costs a minute)
        estimate = args.layers * (3 if output_tokens else 1) * attention_estimate_s(tokens) + 10
        rows[tokens] = attempt(f"transformers {tokens}", deadline, estimate, model_cases.hf_single, model, tokens,
                               device, output_tokens)
    del model
    cases.free_memory()
    return rows


def accuracy_section(args, model_dir: str, device: torch.device, deadline: Deadline) -> dict:
    print("bf16 logits against float32 dense attention (transformers in float32)", flush=True)
    rows = {}
    for tokens in args.accuracy_lengths:
        def compare(tokens=tokens):
            ours = model_cases.ours_last_logits(model_dir, tokens, 64, args.step_tokens, device)
            reference = model_cases.reference_last_logits(model_dir, tokens, 64, device, torch.float32)
            hf_bf16 = model_cases.reference_last_logits(model_dir, tokens, 64, device, torch.bfloat16)
            result = {"ours_bf16": model_cases.compare_logits(ours, reference),
                      "transformers_bf16": model_cases.compare_logits(hf_bf16, reference)}
            mine = result["ours_bf16"]
            result["pass"] = (mine["relative_error"] <= LOGIT_TOLERANCE["relative_error"]
                              and mine["top1_agreement"] >= LOGIT_TOLERANCE["top1_agreement"])
            return result
        rows[tokens] = attempt(f"logits at {tokens}", deadline, 20 * args.layers * attention_estimate_s(tokens) + 20,
                               compare)
    return rows


SECTIONS = {"kernels": kernel_sections, "sweep": sweep_section, "attention": attention_section,
            "engine": engine_section, "transformers": hf_section, "accuracy": accuracy_section}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--layers", type=int, default=2, help="layers of the 8B-shaped model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    parser.add_argument("--block-size", type=int, default=64, help="the config default")
    parser.add_argument("--step-tokens", type=int, default=None, help="default: the config's GPU step budget")
    parser.add_argument("--step-sweep", type=int, nargs="+", default=[2048, 8192, 16384, 32768],
                        help="step budgets whose attention rate is measured at 128K tokens")
    parser.add_argument("--hf-max-tokens", type=int, default=1 << 20, help="longest prompt given to transformers")
    parser.add_argument("--engine-max-tokens", type=int, default=1 << 20, help="longest prompt given to the engine")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="what to run (default: everything)")
    parser.add_argument("--accuracy-lengths", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--budget-s", type=float, default=480, help="cases that would end later are skipped")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes: checks the script")
    args = parser.parse_args()
    args.matmul_size, args.copy_gib, args.decode_kv_bytes_max = 8192, 2.0, 60 * 2**30
    args.preset, args.check_tokens, args.repeats = "llama3-8b-shape", 40_000, 20
    args.check_shapes = cases.DECODE_CHECK_SHAPES
    args.sweep_cases = [(1, 8192), (1, 32768), (1, 131072), (1, 524288), (32, 131072)]
    args.sweep_plans = None  # all of them
    if args.smoke:
        args.lengths, args.accuracy_lengths, args.batches, args.step_sweep = [256, 640], [256], [1, 2], [128]
        args.matmul_size, args.copy_gib, args.preset, args.hf_max_tokens = 512, 0.05, "tiny", 1 << 20
        args.check_tokens, args.repeats, args.check_shapes = 300, 1, [(16, 8, 2, 2)]
        args.sweep_cases, args.sweep_plans = [(1, 256)], 2
    if args.step_tokens is None:
        from cluster.config import SchedulerSettings

        args.step_tokens = SchedulerSettings().max_tokens_per_step
    args.max_model_len = max(args.lengths) + 4096
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    deadline = Deadline(args.budget_s)
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "layers": args.layers, "step_tokens": args.step_tokens,
              "block_size": args.block_size, "logit_tolerance": LOGIT_TOLERANCE}
    for name in ("kernels", "sweep", "attention"):
        if name in args.sections:
            report.update(SECTIONS[name](args, device, deadline))
    model_sections = [name for name in ("engine", "transformers", "accuracy") if name in args.sections]
    with tempfile.TemporaryDirectory() as folder:
        from model_shards.make_model import make_model

        model_dir = model_sections and str(make_model(folder, args.preset, num_hidden_layers=args.layers,
                                                      max_position_embeddings=args.max_model_len))
        for name in model_sections:
            report[name] = SECTIONS[name](args, model_dir, device, deadline)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_report(report, args)
    print(f"wrote {out_dir / 'gpu.json'} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
