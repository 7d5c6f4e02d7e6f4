"""The dense engine's step budget while requests decode (`scheduler.max_tokens_per_step_while_decoding`)
against batches submitted together, as bench/vs_transformers.py's batch rows (8B shape, 2 layers).

Why: a batch's first step prefills max_tokens_per_step (16384) tokens, its first requests then
decode, and the rest of the batch prefills at the while-decoding budget. Session 12 (H100):
16 x 4K prompts had a mean TTFT of 0.42 s (max 0.64) and 737 output tok/s under 2048, against
transformers' 0.21 s and 1253 tok/s at its steady state. A larger budget makes the decoding
requests' steps longer while prompts prefill (their TPOT), which the TPOT columns show.

    python3 bench/step_budgets.py                           # GPU: budgets 2048 4096 8192 16384 (~3 min)
    python3 bench/step_budgets.py --smoke                   # CPU: tiny model, checks the script

Prints a table and writes $OUT/step_budgets.json (else bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vs_transformers_cases import distinct_lengths, ours_generate  # noqa: E402
from bench.gpu_model_cases import random_prompt  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batches", nargs="+", default=["16x4000", "64x1000", "8x32000"], help="COUNTxLENGTH")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each batch, new prompts of the same lengths: the first meets new shapes")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes")
    return parser.parse_args()


def make_engine(model_dir: str, device: torch.device, max_model_len: int, budget: int):
    from cluster.config import LongctxConfig, ModelSettings, SchedulerSettings
    from engine.llm_engine import LLMEngine

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    return LLMEngine(LongctxConfig(model=ModelSettings(path=model_dir, device=str(device), dtype=dtype,
                                                       max_model_len=max_model_len),
                                   scheduler=SchedulerSettings(max_tokens_per_step_while_decoding=budget)))


def batch_row(engine, lengths: list[int], output_tokens: int, seed: int) -> dict:
    prompts = [random_prompt(n, seed + n, engine.architecture.vocab_size) for n in lengths]
    run = ours_generate(engine, prompts, output_tokens)
    ttfts, tpots = run["ttft_s"], sorted(run["tpot_ms"])
    return {"ttft_mean_s": sum(ttfts) / len(ttfts), "ttft_max_s": max(ttfts),
            "tpot_median_ms": tpots[len(tpots) // 2], "tpot_max_ms": tpots[-1],
            "output_tok_per_s": run["output_tok_per_s"]}


def measure_budget(args, model_dir: str, device: torch.device, budget: int, batches: list[list[int]]) -> dict:
    engine = make_engine(model_dir, device, args.max_model_len, budget)
    rows = {}
    try:
        for lengths in batches:
            name = f"{len(lengths)}x{lengths[0]}"
            rows[name] = []
            for repeat in range(args.repeats):  # new prompts each run: no prefix hits
                rows[name].append(batch_row(engine, lengths, args.output_tokens, seed=1000 * repeat))
                print(f"budget {budget:6d} {name:>9} run {repeat + 1}: {format_row(rows[name][-1])}", flush=True)
    finally:
        engine.shutdown()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    return (f"TTFT mean {row['ttft_mean_s']:.3f} s max {row['ttft_max_s']:.3f} s | TPOT median "
            f"{row['tpot_median_ms']:.2f} ms max {row['tpot_max_ms']:.2f} ms | {row['output_tok_per_s']:.0f} tok/s")


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    preset = "tiny" if args.smoke else "llama3-8b-shape"
    if args.smoke:
        args.budgets, args.batches, args.output_tokens, args.repeats = [16, 64], ["4x40"], 4, 1
    batches = [distinct_lengths(int(spec.split("x")[1]), int(spec.split("x")[0])) for spec in args.batches]
    args.max_model_len = max(max(b) for b in batches) + args.output_tokens + 64
    from model_shards.make_model import make_model

    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(make_model(Path(folder) / "model", preset, num_hidden_layers=args.layers,
                                   max_position_embeddings=args.max_model_len))
        report = {str(budget): measure_budget(args, model_dir, device, budget, batches) for budget in args.budgets}
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_budgets.json").write_text(json.dumps({"device": str(device), "rows": report}, indent=2) + "\n")
    print(f"wrote {out / 'step_budgets.json'}")


if __name__ == "__main__":
    main()
