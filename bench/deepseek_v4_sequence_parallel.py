"""DeepSeek-V4 prefill under sequence parallelism: one rank on one GPU against SP ranks on SP GPUs,
through the engine, in one process call: TTFT, prefill tokens/s, decode TPOT, the speedup, and a
check that the SP run samples the same greedy tokens.

GPU (2 x H200, or 2 x H100: a 1M prompt's state is ~0.6 GB at 4 layers), from the repository root
with `.gpu` carried, `timeout_s` 600 (about 5 minutes: ~1 min to write the random-weight folder,
per SP size ~1 min to load and warm up, then the prompts: one H200 prefilled 1M tokens in 23 s in
session 8, so SP=1's three lengths ~40 s with their decodes, SP=2's ~25 s if it halves them):
    source .gpu/install.sh >/dev/null && export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 &&
    python3 bench/deepseek_v4_sequence_parallel.py --preset deepseek-v4-flash-shape --device cuda \\
        --layers 4 --experts 16 --lengths 131072 524288 1048000 --sp 2 --time-budget-s 420
CPU check of the script itself (tiny preset, float32, gloo; its numbers mean nothing; ~15 s):
    python3 bench/deepseek_v4_sequence_parallel.py --dry-run

What runs (docs/deepseek_v4.md, "Sequence parallelism"): SP=1 is an engine whose one rank runs in
this process, as `longctx serve` runs one GPU; SP=N is an engine with
`parallel.sequence_parallel_size: N`, one spawned process per rank (executors/local.py: rank r on
cuda:r, NCCL), each holding a replica of the state, every prefill chunk that gives each rank at
least `--split-min-tokens` tokens cut into N pieces. The SP=1 engine runs every length, is shut down
and its GPU memory freed; then the SP=N engine runs the same lengths. Each engine first serves a
warm-up prompt whose chunks are split like the timed ones, so no Triton compile lands in a timing.

Per length and SP size: TTFT = wall seconds of `generate(prompt, max_tokens=1)`; then the same
prompt again with `--decode-steps` + 1 tokens (a prefix hit: only its last partial block is
computed again) for TPOT. Decodes run eager on both: SP ranks never replay CUDA graphs
(model_shards/deepseek_v4/worker.py), so TPOT compares the step itself. The check: SP=N's first
greedy token equals SP=1's and their logprobs differ by at most the dtype's tolerance (below); a
differing token counts as a near tie, not a failure, when SP=1's top-2 margin is under that
tolerance (random weights give flat logits). Prints a table; writes --out (default
$OUT/deepseek_v4_sequence_parallel.json when OUT is set, else bench/results/) after each phase.
Exit status 1 when the check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/...`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster.config import (CacheSettings, LongctxConfig, ModelSettings, ParallelSettings,  # noqa: E402
                            SchedulerSettings)
from deepseek_v4_paged import make_folder, random_prompt  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.offline import GenerationResult, generate  # noqa: E402
from model_folder.deepseek_v4_config import parse_deepseek_v4_config  # noqa: E402
from protocol.sampling_params import SamplingParams  # noqa: E402
from protocol.step import SampledToken  # noqa: E402
from report import print_table  # noqa: E402

# |logprob(SP=N) - logprob(SP=1)| of a greedy token. bf16 keeps 8 mantissa bits: the SP pieces'
# GEMMs (half the rows) tile and sum differently from the whole chunk's, which moves logits of
# magnitude ~10 by ~0.05 after a few layers (an estimate: the first GPU run gives the figure); a
# wrong piece, gather or order moves them by O(1).
# float32 (the CPU dry run): the 1e-4 of tests/parallel/test_deepseek_v4_parallel.py.
TOLERANCE = {"bfloat16": 0.1, "float16": 0.1, "float32": 1e-4}
SP1_BUDGET_SHARE = 0.6  # SP=1 starts no length after this share of --time-budget-s: SP=N needs the rest
DRY_RUN = dict(preset="deepseek-v4-tiny", device="cpu", lengths=[200, 600], chunk_tokens=64,
               split_min_tokens=8, decode_steps=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v4-tiny")
    parser.add_argument("--layers", type=int, default=4, help="flash shape: the first N of its 43 layers")
    parser.add_argument("--experts", type=int, default=16, help="flash shape: routed experts")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048000])
    parser.add_argument("--chunk-tokens", type=int, default=16384, help="scheduler.max_tokens_per_step")
    parser.add_argument("--sp", type=int, default=2, help="sequence_parallel_size of the second engine")
    parser.add_argument("--split-min-tokens", type=int, default=None,
                        help="parallel.sequence_split_min_tokens (default: the config's)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--time-budget-s", type=float, default=float("inf"),
                        help="start no new length after this (SP=1 after its share of it)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny preset, lengths 200 600, chunks of 64, split from 8 tokens a rank")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.__dict__.update(DRY_RUN)
    if args.sp < 2:
        parser.error("--sp: at least 2 (SP=1 always runs)")
    args.lengths = sorted(args.lengths)
    args.out = args.out or default_out(args.dry_run)
    return args


def default_out(dry_run: bool) -> Path:
    """$OUT on the GPU machine (the folder that comes back); a dry run's numbers go to a temp folder."""
    name = "deepseek_v4_sequence_parallel.json"
    if dry_run:
        return Path(tempfile.gettempdir()) / name
    return Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results") / name


def engine_config(folder: Path, args: argparse.Namespace, sp: int) -> LongctxConfig:
    """Room for the longest prompt's blocks (every SP rank holds all of them), one request at a time."""
    block_size = parse_deepseek_v4_config(json.loads((folder / "config.json").read_text())).kv_block_multiple
    longest = max(args.lengths) + args.decode_steps + 2 * args.chunk_tokens
    split = {} if args.split_min_tokens is None else {"sequence_split_min_tokens": args.split_min_tokens}
    return LongctxConfig(
        model=ModelSettings(path=str(folder), device=args.device, cuda_graph_max_batch=0),
        cache=CacheSettings(num_device_blocks=longest // block_size + 64),
        parallel=ParallelSettings(sequence_parallel_size=sp, **split),
        scheduler=SchedulerSettings(max_tokens_per_step=args.chunk_tokens, max_num_seqs=4,
                                    max_tokens_per_step_while_decoding=args.chunk_tokens))


def greedy(max_tokens: int) -> SamplingParams:
    """Greedy, with the top 2 logprobs: the top-2 margin tells a near tie from a real difference."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)


def generate_one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> GenerationResult:
    result = generate(engine, [prompt], params)[0][0]
    if result.error:
        raise RuntimeError(f"engine: {result.error}")
    return result


def token_entry(token: SampledToken) -> dict:
    top = token.top_logprobs
    margin = top[0][1] - top[1][1] if len(top) >= 2 else None
    return {"token": token.token_id, "logprob": token.logprob, "top2_margin": margin}


def measure_prompt(engine: LLMEngine, prompt: list[int], decode_steps: int) -> dict:
    """TTFT of a max_tokens=1 request, then TPOT of the same prompt decoding (a prefix hit)."""
    start = time.perf_counter()
    first = generate_one(engine, prompt, greedy(1))
    ttft_s = time.perf_counter() - start
    decoded = generate_one(engine, prompt, greedy(decode_steps + 1))
    tpot_ms = None if decoded.tpot_s is None else decoded.tpot_s * 1e3
    return {"length": len(prompt), "ttft_s": ttft_s, "engine_ttft_s": first.ttft_s,
            "prefill_tokens_per_s": len(prompt) / ttft_s, "tpot_ms": tpot_ms,
            "decode_prefix_hit_tokens": decoded.num_prefix_hit_tokens,
            "first": token_entry(first.logprobs[0]), "decoded": [token_entry(t) for t in decoded.logprobs]}


def warm_up(engine: LLMEngine, args: argparse.Namespace, sp: int) -> None:
    """Two full chunks and a last one still split (odd pieces), then a short decode: the split and
    whole paths' kernels compile here, not inside a timed prompt."""
    split_min = engine.config.parallel.sequence_split_min_tokens
    tail = min(args.chunk_tokens - 1, sp * split_min + 3)
    measure_prompt(engine, random_prompt(2 * args.chunk_tokens + tail), 2)


def run_phase(folder: Path, args: argparse.Namespace, sp: int, lengths: list[int], deadline: float) -> dict:
    """Build the SP=`sp` engine, warm it up, measure `lengths` (none started after `deadline`), shut it down."""
    started = time.perf_counter()
    engine = LLMEngine(engine_config(folder, args, sp))
    try:
        description = engine.executor.description
        phase = {"sp": sp, "dtype": description.dtype, "rank0_device": description.device,
                 "split_min_tokens": engine.config.parallel.sequence_split_min_tokens, "rows": []}
        warm_up(engine, args, sp)
        phase["setup_s"] = time.perf_counter() - started
        for length in lengths:
            phase["rows"].append(measure_or_skip(engine, args, length, deadline, sp))
    finally:
        engine.shutdown()
    return phase


def measure_or_skip(engine: LLMEngine, args: argparse.Namespace, length: int, deadline: float, sp: int) -> dict:
    if time.perf_counter() > deadline:
        row = {"length": length, "skipped": "time budget spent"}
    else:
        row = measure_prompt(engine, random_prompt(length), args.decode_steps)
    print(f"SP={sp}", json.dumps({k: v for k, v in row.items() if k != "decoded"}), flush=True)
    return row


def free_device_memory(device: str) -> float | None:
    """After an engine's shutdown: collect its worker (pools and weights) and return the cached
    blocks, so the SP ranks' rank 0 gets this GPU whole; GiB still allocated here."""
    gc.collect()
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def compare_length(one: dict, many: dict, tolerance: float) -> dict:
    """SP=N against SP=1 at one length: speedups, the first token, and the decode tokens up to the
    first that differs (after it the two continue from different contexts)."""
    first_one, first_many = one["first"], many["first"]
    first_equal = first_one["token"] == first_many["token"]
    first_diff = abs(first_one["logprob"] - first_many["logprob"])
    diffs, equal_tokens = [], 0
    for a, b in zip(one["decoded"], many["decoded"]):
        diffs.append(abs(a["logprob"] - b["logprob"]))
        if a["token"] != b["token"]:
            break
        equal_tokens += 1
    return {"length": one["length"], "ttft_speedup": one["ttft_s"] / many["ttft_s"],
            "tpot_ratio": ratio(many["tpot_ms"], one["tpot_ms"]), "first_token_equal": first_equal,
            "first_logprob_abs_diff": first_diff, "first_top2_margin_sp1": first_one["top2_margin"],
            "decode_tokens_equal": equal_tokens, "decode_tokens": len(one["decoded"]),
            "decode_max_logprob_abs_diff": max(diffs, default=0.0),
            "verdict": verdict(first_equal, first_diff, first_one["top2_margin"], tolerance)}


def verdict(first_equal: bool, first_diff: float, margin: float | None, tolerance: float) -> str:
    """pass: the same token, logprobs within tolerance; near tie: another token where SP=1's best
    two were closer than the tolerance (either is a right answer in this dtype); else FAIL."""
    if first_equal:
        return "pass" if first_diff <= tolerance else "FAIL"
    return "near tie" if margin is not None and margin < tolerance else "FAIL"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if not numerator or not denominator else numerator / denominator


def compare_phases(one: dict, many: dict) -> dict:
    tolerance = TOLERANCE[one["dtype"]]
    measured = {row["length"]: row for row in many["rows"] if "skipped" not in row}
    rows = [compare_length(row, measured[row["length"]], tolerance) for row in one["rows"]
            if row["length"] in measured]
    first_diffs = [row["first_logprob_abs_diff"] for row in rows]
    return {"tolerance": tolerance, "dtype": one["dtype"], "lengths": rows,
            "max_first_logprob_abs_diff": max(first_diffs, default=None),
            "passed": bool(rows) and all(row["verdict"] != "FAIL" for row in rows)}


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpus": os.cpu_count(), "gpus": []}
    if device == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int before
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def table_rows(one: dict, many: dict, comparison: dict) -> list[dict]:
    by_length = {row["length"]: row for row in many["rows"] if "skipped" not in row}
    rows = []
    for checked in comparison["lengths"]:
        length = checked["length"]
        a, b = next(r for r in one["rows"] if r["length"] == length), by_length[length]
        rows.append({"tokens": length, "SP1 TTFT s": f"{a['ttft_s']:.3f}", f"SP{many['sp']} TTFT s": f"{b['ttft_s']:.3f}",
                     "speedup": f"{checked['ttft_speedup']:.2f}x", "SP1 tok/s": f"{a['prefill_tokens_per_s']:.0f}",
                     f"SP{many['sp']} tok/s": f"{b['prefill_tokens_per_s']:.0f}", "SP1 TPOT ms": fmt(a["tpot_ms"]),
                     f"SP{many['sp']} TPOT ms": fmt(b["tpot_ms"]), "1st equal": checked["first_token_equal"],
                     "|dlogprob| 1st": f"{checked['first_logprob_abs_diff']:.2e}",
                     "decode equal": f"{checked['decode_tokens_equal']}/{checked['decode_tokens']}",
                     "check": checked["verdict"]})
    return rows


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def json_value(value):
    """Paths as text, an unlimited time budget as null (strict JSON has no Infinity)."""
    if isinstance(value, Path):
        return str(value)
    return None if value == float("inf") else value


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def print_summary(report: dict) -> None:
    one, many, comparison = report["sp1"], report[f"sp{report['settings']['sp']}"], report["comparison"]
    if comparison["lengths"]:
        print_table(f"DeepSeek-V4 {report['settings']['preset']}, {one['dtype']}, SP=1 against SP={many['sp']}",
                    table_rows(one, many, comparison))
    skipped = [row["length"] for row in one["rows"] + many["rows"] if "skipped" in row]
    print(f"correctness: {'PASS' if comparison['passed'] else 'FAIL'}; max |logprob SP{many['sp']} - SP1| of the "
          f"first tokens {comparison['max_first_logprob_abs_diff']} (tolerance {comparison['tolerance']}, "
          f"{comparison['dtype']}); skipped lengths: {skipped or 'none'}")
    print(f"wrote {report['out']}  ({report['total_s']:.0f} s)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":  # SP=1 gets the cores of one SP rank (join_world): idle OpenMP threads spin
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.sp))
    started = time.perf_counter()
    folder = make_folder(args)
    settings = {key: json_value(value) for key, value in vars(args).items()}
    report = {"settings": settings, "environment": environment(args.device), "out": str(args.out)}
    try:
        report["folder_s"] = time.perf_counter() - started
        sp1_deadline = started + args.time_budget_s * SP1_BUDGET_SHARE
        report["sp1"] = run_phase(folder, args, 1, args.lengths, sp1_deadline)
        report["sp1"]["device_gib_left"] = free_device_memory(args.device)
        write_report(args.out, report)
        measured = [row["length"] for row in report["sp1"]["rows"] if "skipped" not in row]
        many = report[f"sp{args.sp}"] = run_phase(folder, args, args.sp, measured, started + args.time_budget_s)
        report["comparison"] = compare_phases(report["sp1"], many)
        report["total_s"] = time.perf_counter() - started
        write_report(args.out, report)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_summary(report)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["comparison"]["passed"] else 1)
