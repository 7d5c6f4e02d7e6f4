"""longctx against Hugging Face transformers on one GPU, out of the box: TTFT and time per output
token for one request at 4K to 1M tokens, and for batches submitted together.

    source .gpu/install.sh >/dev/null && python3 bench/vs_transformers.py 2>&1 | tee $OUT/vs_transformers.log
    python3 bench/vs_transformers.py --smoke    # on a CPU: tiny model and sizes, checks the script

The same 8B-shaped bf16 folder (2 layers) for both. longctx runs its engine with every default
(only the device, dtype and context length given); transformers runs `generate` with sdpa
attention, batches left-padded into one call. Every measured prompt length differs from the
warm-up lengths (and from each other), so a kernel that plans per exact shape pays its plans
inside the measured TTFT, as a served request of a new length would. Lengths up to
--repeat-max-tokens run twice, the second time with other tokens of the same length: the
difference is what shape-keyed planning costs. transformers' figures are its steady state, each
case run a second time at the same shape with cuDNN's per-shape attention plans built by the
first (on Hopper its SDPA goes to cuDNN: ~50-80 ms a new shape, and its decode makes a new shape
every token); the first call is reported apart ("HF 1st"). Greedy tokens are compared (first 8).
Writes vs_transformers.json under $OUT (or bench/results/) and prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import gpu_cases  # noqa: E402
from bench import gpu_model_cases as model_cases  # noqa: E402
from bench import vs_transformers_cases as cases  # noqa: E402
from bench.gpu import Deadline, attempt  # noqa: E402

LENGTHS = [4000, 8100, 32700, 130000, 520000, 1040000]
WARMUP_LENGTHS = [300, 1000]
BATCHES = ["16x4000", "8x32000"]  # count x base length; lengths base, base + 61, ...
REPEAT_SEED_OFFSET = 7
PROFILE_SEED_OFFSET = 13  # profiled prompts share no prefix with the measured ones
HF_NATIVE_CONTEXT = 131072  # the llama3-8b-shape preset's max_position_embeddings  # the repeat of a length uses seed length + 7: other tokens, same shape


def prefill_estimate_s(tokens: int, layers: int) -> float:
    """A generous wall-time guess for one prefill (a 2-layer 8B shape ran 1M tokens in ~33 s; this says ~47)."""
    return layers * (tokens / 1e6) ** 2 * 16 + tokens / 1e5 + 2


def parse_batches(specs: list[str]) -> list[list[int]]:
    batches = []
    for spec in specs:
        count, base = (int(part) for part in spec.split("x"))
        batches.append(cases.distinct_lengths(base, count))
    return batches


def ours_section(args, model_dir: str, device: torch.device, deadline: Deadline, **model_settings) -> dict:
    print(f"longctx: the engine with its defaults{f', but {model_settings}' if model_settings else ''}", flush=True)
    engine = model_cases.make_engine(model_dir, device, args.max_model_len, **model_settings)
    report = {"single": {}, "repeat": {}, "batch": {}, "profile": {}, "warmup": {}}
    try:
        for tokens in args.warmup_lengths:  # the first is a fresh server's first request
            report["warmup"][tokens] = cases.ours_single(engine, tokens, 4, tokens)
        for tokens in args.lengths:
            estimate = prefill_estimate_s(tokens, args.layers) * 1.3 + 3
            report["single"][tokens] = attempt(f"longctx {tokens}", deadline, estimate, cases.ours_single,
                                               engine, tokens, args.output_tokens, tokens)
            if tokens <= args.repeat_max_tokens:
                report["repeat"][tokens] = attempt(f"longctx {tokens} again (same shape)", deadline, estimate,
                                                   cases.ours_single, engine, tokens, args.output_tokens,
                                                   tokens + REPEAT_SEED_OFFSET)
        for lengths in args.batches:
            report["batch"][batch_name(lengths)] = attempt(f"longctx batch {batch_name(lengths)}", deadline, 30,
                                                           cases.ours_batch, engine, lengths, args.output_tokens)
        for index, tokens in enumerate(args.profile_lengths):  # a length given twice: new, then again
            report["profile"][f"{tokens}#{index}"] = attempt(f"profile {tokens}", deadline, 20, cases.profile_request,
                                                             engine, tokens, tokens + PROFILE_SEED_OFFSET + index)
    finally:
        engine.shutdown()
        del engine
        gpu_cases.free_memory()
    return report


def hf_section(args, model_dir: str, device: torch.device, deadline: Deadline) -> dict:
    """Prompts up to the folder's native context on a copy of it that says so in config.json
    (max_position_embeddings 131072, as in ../shared/measurements/hf_vs_longctx.py: the same
    weights and, with llama3 RoPE, the same logits), longer ones on the folder itself.

    Every figure in the tables is transformers' steady state: a generate at a shape it ran just
    before (same batch, lengths and output count, other tokens); that first call is kept apart
    ("first_call"). On an H100 (torch 2.11, cuDNN 9.15+) SDPA goes to cuDNN, which builds an
    execution plan per new shape (~50-80 ms of host time) and keeps it per thread: transformers'
    first generate at a length pays one for its prefill and one for each decode step, since the
    key length grows by one a step (see vs_transformers_cases). This was the "45-85 ms a forward"
    of sessions 8-10: every case ran at a length new to the process, while the diagnostic's calls
    at 4000 tokens reused the plans of the 4000 case run before them. The diagnostic keeps five
    calls on one model, now at a length not run before (call 1 pays the plans, 2-5 do not), and
    one call at another new length with cuDNN left out of SDPA's choices."""
    print("transformers (sdpa), the same weights and prompts", flush=True)
    native = native_context_copy(model_dir, HF_NATIVE_CONTEXT)
    report = {"single": {}, "batch": {}, "diagnostic": {}, "sdpa": {}}
    lengths = [n for n in args.lengths if n <= args.hf_max_tokens]

    def on_native(model) -> None:
        report["sdpa"] = sdpa_attempt(deadline, model, min(args.lengths), device)
        for tokens in [n for n in lengths if n <= HF_NATIVE_CONTEXT]:
            report["single"][tokens] = hf_attempt(args, deadline, model, tokens, device)
        for batch in args.batches:
            report["batch"][batch_name(batch)] = attempt(
                f"transformers batch {batch_name(batch)}", deadline, 60, cases.hf_batch_steady, model, batch,
                args.output_tokens, device, REPEAT_SEED_OFFSET)
        report["diagnostic"] = hf_diagnostic(args, deadline, model, device)

    def on_long(model) -> None:
        for tokens in [n for n in lengths if n > HF_NATIVE_CONTEXT]:
            report["single"][tokens] = hf_attempt(args, deadline, model, tokens, device)

    on_loaded_model(args, native, device, on_native)
    if any(n > HF_NATIVE_CONTEXT for n in lengths):
        on_loaded_model(args, model_dir, device, on_long)
    report["single"] = {n: report["single"][n] for n in lengths if n in report["single"]}  # in --lengths order
    return report


def on_loaded_model(args, folder: str, device: torch.device, case) -> None:
    """case(model) on a model loaded for it, after one short generate (the process's first CUDA
    kernels and handles; its shape is none of the measured ones), freed after."""
    model = cases.load_hf(folder, device)
    try:
        cases.hf_single(model, args.warmup_lengths[0], 2, args.warmup_lengths[0], device)
        case(model)
    finally:
        del model
        gpu_cases.free_memory()


def hf_attempt(args, deadline: Deadline, model, tokens: int, device: torch.device) -> dict:
    """One request at `tokens`, measured at a shape run just before (the first call apart)."""
    estimate = (prefill_estimate_s(tokens, args.layers) * 1.5 + 3) * 2
    return attempt(f"transformers {tokens}", deadline, estimate, cases.hf_single_steady, model, tokens,
                   args.output_tokens, tokens, device, REPEAT_SEED_OFFSET)


def hf_diagnostic(args, deadline: Deadline, model, device: torch.device) -> dict:
    """Five generate calls on one model at a length no case ran (its decode lengths too), then
    one at another such length with SDPA's cuDNN backend left out (flash, efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    run = args.lengths + args.warmup_lengths  # batches have shapes of their own (batch size)
    tokens = unused_length(min(args.lengths), run, args.output_tokens)
    estimate = prefill_estimate_s(tokens, args.layers) * 1.5 + 3
    rows = {f"call {call}": attempt(f"transformers {tokens} call {call}", deadline, estimate, cases.hf_single, model,
                                    tokens, args.output_tokens, tokens + call, device)
            for call in range(1, 6)}
    other = unused_length(tokens, run + [tokens], args.output_tokens)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        rows[f"{other}, no cuDNN"] = attempt(f"transformers {other} without cuDNN attention", deadline, estimate,
                                             cases.hf_single, model, other, args.output_tokens, other, device)
    return {tokens: rows}


def unused_length(start: int, taken: list[int], output_tokens: int) -> int:
    """The first length past `start` whose prompt and decode key lengths (n .. n + output_tokens)
    meet none of those of the `taken` lengths."""
    n = start + 1
    while any(abs(n - m) <= output_tokens + 1 for m in taken):
        n += 1
    return n


def sdpa_attempt(deadline: Deadline, model, tokens: int, device: torch.device) -> dict:
    return attempt(f"SDPA backend torch picks for transformers at {tokens}", deadline, 5, cases.sdpa_choices, model,
                   tokens, device)


def native_context_copy(model_dir: str, context: int) -> str:
    """A folder beside model_dir with the same files (links) but config.json's
    max_position_embeddings set to `context`."""
    copy = Path(model_dir).parent / f"native-{context}"
    copy.mkdir(exist_ok=True)
    for path in Path(model_dir).iterdir():
        if path.name != "config.json" and not (copy / path.name).exists():
            (copy / path.name).symlink_to(path.resolve())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["max_position_embeddings"] = min(context, config["max_position_embeddings"])
    (copy / "config.json").write_text(json.dumps(config, indent=1))
    return str(copy)


def ours_unfused_section(args, model_dir: str, device: torch.device, deadline: Deadline) -> dict:
    """The engine with torch's elementwise ops in its layers (as before session 18): the fused
    layer kernels' A/B (model.fused_layer_kernels)."""
    return ours_section(args, model_dir, device, deadline, fused_layer_kernels=False)


SECTIONS = {"ours": ours_section, "ours_unfused": ours_unfused_section, "transformers": hf_section}


def batch_name(lengths: list[int]) -> str:
    return f"{len(lengths)}x{lengths[0]}-{lengths[-1]}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--batches", nargs="*", default=BATCHES, help="COUNTxLENGTH, e.g. 16x4000")
    parser.add_argument("--layers", type=int, default=2, help="layers of the 8B-shaped model")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--repeat-max-tokens", type=int, default=131072,
                        help="lengths up to this run a second time at the same shape")
    parser.add_argument("--profile-lengths", type=int, nargs="*", default=[4000, 8300, 33000],
                        help="lengths profiled last (torch.profiler + cProfile), new tokens: a length run before "
                             "shows the steady state, a new one what a new length costs")
    parser.add_argument("--hf-max-tokens", type=int, default=1 << 21, help="longest prompt given to transformers")
    parser.add_argument("--sections", nargs="+", default=["ours", "transformers"], choices=list(SECTIONS),
                        help="ours_unfused: ours with model.fused_layer_kernels off, an A/B of the fused kernels")
    parser.add_argument("--budget-s", type=float, default=330, help="cases that would end later are skipped")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes: checks the script")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # a section's own process: the folder made
    parser.add_argument("--section-json", help=argparse.SUPPRESS)  # and where its results go
    args = parser.parse_args()
    args.preset, args.warmup_lengths = "llama3-8b-shape", WARMUP_LENGTHS
    if args.smoke:
        args.preset, args.lengths, args.warmup_lengths = "tiny", [200, 330], [40]
        args.batches, args.profile_lengths, args.output_tokens = ["3x100"], [150], 4
    args.batch_specs, args.batches = args.batches, parse_batches(args.batches)
    longest = max(args.lengths + args.profile_lengths + [max(b) for b in args.batches])
    args.max_model_len = longest + args.output_tokens + 64
    return args


def main() -> None:
    args = parse_args()
    if args.section_json:
        run_section_here(args)
        return
    deadline = Deadline(args.budget_s)
    started = time.perf_counter()
    report = {"layers": args.layers, "output_tokens": args.output_tokens}
    with tempfile.TemporaryDirectory() as folder:
        from model_shards.make_model import make_model

        model_dir = str(make_model(Path(folder) / "model", args.preset, num_hidden_layers=args.layers,
                                   max_position_embeddings=args.max_model_len))
        for name in args.sections:
            report[name] = run_section_isolated(args, name, model_dir, deadline)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vs_transformers.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    from bench.vs_transformers_report import print_report

    print_report(report)
    print(f"wrote {out_dir / 'vs_transformers.json'} in {report['wall_s']} s")


def run_section_isolated(args, name: str, model_dir: str, deadline: Deadline) -> dict:
    """One section in a fresh interpreter. In session 5's H200 runs transformers' generate, run in
    the process where our engine had just run, took 40-75 ms a token against 3-4 ms in a model
    loaded after it (likely cuDNN's per-shape attention plans, see hf_section, not the process):
    each side gets a process of its own all the same."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / f"{name}.json"
        budget_s = max(deadline.end - time.monotonic(), 1.0)
        subprocess.run(child_command(args, name, model_dir, budget_s, str(result)), check=False)
        return json.loads(result.read_text()) if result.exists() else {"error": f"the {name} process failed"}


def child_command(args, name: str, model_dir: str, budget_s: float, result: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--sections", name, "--budget-s", f"{budget_s:.1f}",
               "--model-dir", model_dir, "--section-json", result, "--layers", str(args.layers),
               "--output-tokens", str(args.output_tokens), "--repeat-max-tokens", str(args.repeat_max_tokens),
               "--hf-max-tokens", str(args.hf_max_tokens), "--lengths", *map(str, args.lengths),
               "--batches", *args.batch_specs, "--profile-lengths", *map(str, args.profile_lengths)]
    return command + (["--smoke"] if args.smoke else [])


def run_section_here(args) -> None:
    device = torch.device("cpu" if args.smoke else "cuda")
    report = SECTIONS[args.sections[0]](args, args.model_dir, device, Deadline(args.budget_s))
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report["torch"] = torch.__version__
    Path(args.section_json).write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
