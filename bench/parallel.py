"""Tensor and sequence parallelism on 2 GPUs (NCCL; `--world 4` / `8` for more), in one run of a few minutes:

(a) correctness: logits of TP=2 and SP=2 against one GPU, on the `small` preset in bf16;
(b) prefill of an 8B-shaped model (--layers, default 2) at 8K, 128K, 512K and 1M tokens, one GPU
    against SP=2 (ring attention), with each GPU's attention TFLOP/s against the single-GPU cuDNN
    SDPA rate of the same run and the ring's exposed communication; and for every rank and layer:
    its timeline on a clock shared at a barrier, each ring step's kernel and wait, the memory it
    allocated (peak, allocator retries, cudaMalloc/cudaFree) and the GPU's clocks, power,
    temperature and throttling over it (bench/parallel_scaling.py: why a layer is slow);
(c) decode steps after each prefill, and over a 1M-token cache of a --decode-layers model (16),
    one GPU against SP=2: the step, its forward, its attention, per layer and rank;
(d) prefill attention alone (no model): one GPU, then SP=2 as ring attention and as Ulysses on
    identical rows; and two ring calls back to back on the high-priority SP stream against a
    normal one (bench/parallel_attention_modes.py);
(e) TP=2 against SP=2 against one GPU at 8K, 128K and 512K, prefill and decode: the table behind
    docs/parallelism.md's rule for choosing a layout (bench/parallel_layouts.py).

Run from the repo root on a 2-GPU machine: `python3 bench/parallel.py` (about 6 minutes;
`--sizes 131072 524288 --layout-sizes 131072` for a shorter run, `--skip-correctness
--skip-scaling --skip-layouts` for (d) alone). On 4 or 8 GPUs: `--world 4` runs SP=4 and TP=4
everywhere and checks TP=4, SP=4 and TP 2 x SP 2 in (a). Prints tables; writes
$OUT/parallel.json if OUT is set, else bench/results/parallel.json, after every phase (a cut-off
run still leaves what it measured).
`--dry-run` runs every phase on the CPU (gloo, a tiny model, small sizes) to check the script
itself before spending GPU time; its numbers mean nothing.

bf16 tolerance of (a). Each rank reorders bf16 sums (TP all-reduces, log-sum-exp merges of
attention partials in float32, a different attention kernel), which moves logits by about as much
as bf16 itself does. So a parallel run must be about as close to the float32 truth (one GPU,
float32, the reference attention) as the single-GPU bf16 run is: mean |logit - fp32| at most 1.5x
single-GPU bf16's, max at most 2x + 0.05 (a maximum over ~16M logits of std ~4 varies more between
two equally good runs than a mean does). A wrong head, stripe, mask or merge moves logits by O(1)
and fails both by a wide margin.

One GPU runs the same sequence-parallel attention backend (a one-rank ring: the fused causal
kernel with log-sum-exp and the paged-cache writes), so the speedups compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/parallel.py`

from model_folder.hf_config import load_architecture  # noqa: E402
from model_shards.llama import LlamaForCausalLM  # noqa: E402
from model_shards.make_model import make_model  # noqa: E402
from model_shards.parallel.groups import ParallelLayout, build_layout  # noqa: E402
from model_shards.parallel.lse_attention import KERNELS, kernel_matches_reference  # noqa: E402
from model_shards.parallel.sp_attention import SequenceParallelBackend, build_local_batch  # noqa: E402
from model_shards.parallel.sp_plan import StepSequence  # noqa: E402
from parallel_attention_modes import attention_modes, print_attention_modes  # noqa: E402  (bench/ is on sys.path)
from parallel_common import DRY_RUN, LLAMA3_8B, Shape, causal_flops, cuda_time  # noqa: E402
from parallel_layouts import layouts  # noqa: E402
from parallel_scaling import Bench, scaling  # noqa: E402


def results_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "parallel.json" if out else Path(__file__).resolve().parent / "results" / "parallel.json"


# --- (0) kernels and the cuDNN SDPA reference rate --------------------------------------------------


def kernel_report(device: torch.device, shape: Shape) -> dict:
    return {name: kernel_matches_reference(kernel, device, torch.bfloat16, shape.heads, shape.kv_heads,
                                           shape.head_dim)
            for name, kernel in KERNELS.items() if name != "reference"}


def sdpa_rate(device: torch.device, shape: Shape, length: int, backend) -> float:
    """TFLOP/s of one causal SDPA call (B=1, K/V expanded to the query heads) under `backend`."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(1, shape.heads, length, shape.head_dim, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    with sdpa_kernel(backend):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        seconds = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats=3)
    return causal_flops(shape, length) / seconds / 1e12



# --- (a) correctness --------------------------------------------------------------------------------


def run_schedule(model: LlamaForCausalLM, layout: ParallelLayout, tokens: list[int], schedule: list[int],
                 block_size: int, device: torch.device) -> dict[int, torch.Tensor]:
    """One sequence through `schedule` (tokens per step); position -> logits of this rank's rows."""
    num_blocks = -(-len(tokens) // block_size)
    cache = model.allocate_kv_cache(num_blocks, block_size // layout.sp.size)
    table, computed, logits_at = list(range(num_blocks)), 0, {}
    for num_new in schedule:
        batch = build_local_batch([StepSequence(table, computed, num_new)], [tokens], block_size, layout.sp, device)
        logits = model.compute_logits(model(batch.input_ids, batch.metadata.positions, batch.metadata, cache))
        # A row of a tensor pickles its whole storage: clone each, or gathering them costs GBs.
        logits_at.update(zip(batch.metadata.positions.tolist(), (row.clone() for row in logits.float().cpu())))
        computed += num_new
    return logits_at


def correctness(rank: int, device: torch.device, preset: str, world: int) -> dict:
    folder = Path(tempfile.gettempdir()) / f"longctx-bench-parallel-{preset}"
    if rank == 0:
        make_model(folder, preset, seed=0, dtype="bfloat16")
    dist.barrier()
    vocab = load_architecture(folder).vocab_size
    tokens = torch.randint(10, vocab - 10, (1001,), generator=torch.Generator().manual_seed(0)).tolist()
    schedule = [777, 216, 1, 1, 1, 1, 1, 1, 1, 1]  # a prefill, a chunk over its cache, 8 decodes
    runs = {}
    if rank == 0:  # one GPU: float32 (the truth) and bf16, reference attention
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = LlamaForCausalLM.from_folder(folder, dtype=dtype, device=device)
            runs[name] = run_schedule(model, ParallelLayout.single(), tokens[:sum(schedule)], schedule, 16, device)
    for name, (tp, sp) in parallel_layouts(world).items():
        layout = build_layout(tp, sp, device)
        backend = SequenceParallelBackend(layout.sp) if sp > 1 else "torch_sdpa"
        model = LlamaForCausalLM.from_folder(folder, dtype=torch.bfloat16, device=device, attention_backend=backend,
                                             tp=layout.tp)
        mine = run_schedule(model, layout, tokens[:sum(schedule)], schedule, 16, device)
        shares = [None] * world if rank == 0 else None
        dist.gather_object(mine if layout.tp.rank == 0 else {}, shares, dst=0)
        if rank == 0:
            runs[name] = {p: logits for share in shares for p, logits in share.items()}
            runs[name + "_kernel"] = getattr(backend, "kernel_name", "torch_sdpa")
    return compare_logits(runs) if rank == 0 else {}


def parallel_layouts(world: int) -> dict[str, tuple[int, int]]:
    """name -> (tp, sp) of the layouts checked against one GPU: all TP, all SP, and TP 2 x SP."""
    layouts = {f"tp{world}": (world, 1), f"sp{world}": (1, world)}
    if world >= 4 and world % 2 == 0:
        layouts[f"tp2xsp{world // 2}"] = (2, world // 2)
    return layouts


def compare_logits(runs: dict) -> dict:
    positions = sorted(runs["fp32"])
    truth = torch.stack([runs["fp32"][p] for p in positions])  # (positions, vocab)
    def error(name: str) -> dict:
        logits = torch.stack([runs[name][p] for p in positions])
        diff = (logits - truth).abs()
        return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                "top1_vs_fp32": (logits.argmax(-1) == truth.argmax(-1)).float().mean().item()}
    report = {"logit_std": truth.std().item(), "positions": len(positions), "single_bf16": error("bf16")}
    base = report["single_bf16"]
    for name in (n for n in runs if n.startswith(("tp", "sp")) and not n.endswith("_kernel")):
        row = error(name)
        row["pass"] = row["max_abs"] <= 2 * base["max_abs"] + 0.05 and row["mean_abs"] <= 1.5 * base["mean_abs"]
        row["kernel"] = runs.get(name + "_kernel")
        report[name] = row
    return report


def summarize(results: dict) -> None:
    scaling_result = results.get("scaling", {})
    prefill = {(r["tokens"], r["sp"]): r for r in scaling_result.get("prefill", [])}
    reference = results.get("single_gpu_sdpa_TFLOPs", {}).get("cudnn")
    for row in prefill.values():
        if isinstance(reference, float):
            rates = row["attention_TFLOPs_per_gpu"]
            row["attention_vs_cudnn_sdpa"] = sum(rates) / len(rates) / reference
            print(f"{row['tokens']:>8} tokens sp={row['sp']}: attention per GPU at "
                  f"{100 * row['attention_vs_cudnn_sdpa']:.0f}% of the single-GPU cuDNN SDPA rate "
                  f"({reference:.0f} TFLOP/s)")
    for (tokens, sp), row in sorted(prefill.items()):
        if sp > 1 and (tokens, 1) in prefill:
            row["speedup_vs_sp1"] = prefill[(tokens, 1)]["total_s"] / row["total_s"]
            row["scaling_efficiency"] = row["speedup_vs_sp1"] / sp
            print(f"SP={sp} prefill speedup at {tokens} tokens: {row['speedup_vs_sp1']:.2f}x, "
                  f"{100 * row['scaling_efficiency']:.0f}% efficiency (goal: 95% at SP=2, 90% at 4, 85% at 8)")
    longest = max((r["context"] for r in scaling_result.get("decode", [])), default=None)
    decode_speedup(results, "decode_speedup",
                   [r for r in scaling_result.get("decode", []) if r["context"] == longest and r["tp"] == 1])
    decode_speedup(results, "deep_decode_speedup", scaling_result.get("deep_decode", []))
    for comm in scaling_result.get("exposed_comm", []):
        print(f"ring at {comm['tokens']} tokens (rank 0): {comm['ring_s']:.3f} s with comm, "
              f"{comm['compute_only_s']:.3f} s compute only, exposed {comm['exposed_comm_s'] * 1e3:.1f} ms; "
              f"KV block {comm['kv_block_MB']:.0f} MB at {comm['p2p_GBps']:.0f} GB/s")
    if results.get("attention_modes", {}).get("rows"):
        print_attention_modes(results["attention_modes"]["rows"])


def decode_speedup(results: dict, key: str, rows: list[dict]) -> None:
    """One GPU against SP over the same context: step, forward and attention, and the per-layer
    attention steps (kernel, all-gather, the rest: stripe gathers, writes, merge) of the last step."""
    by_sp = {r["sp"]: r for r in rows}
    sp = max(by_sp, default=1)
    if 1 not in by_sp or sp == 1:
        return
    one, many = by_sp[1], by_sp[sp]
    speedup = {name: one[name + "_s"] / many[name + "_s"] for name in ("step", "forward", "attention")}
    results[key] = speedup
    print(f"decode over {one['context']} tokens, {one['layers']} layers, 1 -> {sp} GPUs (goal at 2: >= 1.8x): "
          + ", ".join(f"{name} {one[name + '_s'] * 1e3:.2f} -> {many[name + '_s'] * 1e3:.2f} ms "
                      f"({speedup[name]:.2f}x)" for name in speedup)
          + f"; KV read {one['kv_GBps_per_gpu']:.0f} / {many['kv_GBps_per_gpu']:.0f} GB/s per GPU")
    for row in (one, many):
        for layers in row["last_step_ranks"]:
            parts = {}
            for layer in layers:
                for kind, seconds in layer["steps"]:
                    kind = "gather" if kind == "gather" else "kernel" if kind.startswith("block") else kind
                    parts[kind] = parts.get(kind, 0.0) + seconds
            attention = sum(layer["attention_s"] or 0 for layer in layers)
            print(f"  sp={row['sp']} rank {layers[0]['rank'] if layers else '?'}: attention {attention * 1e3:.2f} ms = "
                  + " + ".join(f"{kind} {seconds * 1e3:.2f}" for kind, seconds in parts.items())
                  + f" + rest {(attention - sum(parts.values())) * 1e3:.2f} ms (projections, RoPE, stripe gathers, "
                  "writes, merge)")


def rank_main(rank: int, port: int, options) -> None:
    device = torch.device("cpu") if options.dry_run else torch.device("cuda", rank)
    world = options.world
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    results: dict = {"torch": torch.__version__, "gpu": name, "layers": options.layers, "sizes": options.sizes}
    bench = Bench(rank, device, options)
    if rank == 0:
        results["kernels_matching_reference"] = kernel_report(device, options.shape)
        results["single_gpu_sdpa_TFLOPs"] = reference_rates(device, options.shape, options.reference_length)
        print(json.dumps({k: results[k] for k in ("gpu", "torch", "kernels_matching_reference",
                                                  "single_gpu_sdpa_TFLOPs")}), flush=True)
    dist.barrier()
    run_phases(bench, results)
    summarize(results) if rank == 0 else None
    save(rank, results)
    dist.barrier()
    dist.destroy_process_group()


def run_phases(bench: Bench, results: dict) -> None:
    """(a) to (e), each saved as soon as it is measured (and partial runs after every run)."""
    rank, device, options = bench.rank, bench.device, bench.options

    def checkpoint(key):
        return lambda partial: save(rank, {**results, key: partial})
    if not options.skip_correctness:
        results["correctness"] = correctness(rank, device, "tiny" if options.dry_run else "small", options.world)
        save(rank, results)
        if rank == 0:
            print(json.dumps({"correctness": results["correctness"]}, indent=1), flush=True)
    if not options.skip_scaling:
        results["scaling"] = scaling(bench, checkpoint("scaling"))
        save(rank, results)
    if not options.skip_layouts and options.world > 1 and not options.skip_scaling:
        results["layouts"] = layouts(bench, results["scaling"], checkpoint("layouts"))
        save(rank, results)
    if options.world > 1:  # ring against Ulysses needs two ranks at least
        results["attention_modes"] = attention_modes(rank, device, options, checkpoint("attention_modes"))


def reference_rates(device: torch.device, shape: Shape, length: int) -> dict:
    from torch.nn.attention import SDPBackend

    rates: dict = {"length": length}
    backends = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
    if device.type != "cuda":
        backends = (("math", SDPBackend.MATH),)
    for name, backend in backends:
        try:
            rates[name] = sdpa_rate(device, shape, length, backend)
        except RuntimeError as error:  # a backend this build or GPU lacks
            rates[name] = f"unavailable: {str(error).splitlines()[0][:120]}"
    return rates


def save(rank: int, results: dict) -> None:
    if rank != 0:
        return
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 131072, 524288, 1048576])
    parser.add_argument("--layout-sizes", type=int, nargs="+", default=[8192, 131072, 524288],
                        help="(e): prompt lengths of TP against SP against one GPU (a subset of --sizes)")
    parser.add_argument("--decode-layers", type=int, default=16, help="(c): layers of the model decoding over a "
                        "--decode-context cache (16 of the 8B shape at 1M: 69 GB of KV on one GPU)")
    parser.add_argument("--decode-context", type=int, default=1048576)
    parser.add_argument("--cooldown-s", type=float, default=15.0,
                        help="(b): before a run of 512K tokens or more, wait at most this long for the GPUs to "
                             "cool to within 5 C of their starting temperature")
    parser.add_argument("--comm-max", type=int, default=524288, help="measure exposed ring communication up to this")
    parser.add_argument("--reference-length", type=int, default=131072, help="tokens of the cuDNN SDPA reference call")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true", help="skip (b), (c) and (e): model prefill and decode")
    parser.add_argument("--skip-layouts", action="store_true", help="skip (e): TP against SP against one GPU")
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny model and sizes: checks the script")
    parser.add_argument("--world", type=int, default=2,
                        help="GPUs: SP over all of them (4 and 8: issue 6's run; 1: the single-GPU baseline alone)")
    options = parser.parse_args()
    options.shape, options.long_run = LLAMA3_8B, 1 << 19  # long runs: cool down first, print every rank's layers
    if options.dry_run:
        options.long_run = 1024
        options.shape, options.sizes, options.layout_sizes = DRY_RUN, [512, 1024], [512, 1024]
        options.comm_max, options.reference_length, options.decode_context, options.decode_layers = 1024, 256, 2048, 3
    elif torch.cuda.device_count() < options.world:
        sys.exit(f"needs {options.world} GPUs, found {torch.cuda.device_count()}")
    if not set(options.layout_sizes) <= set(options.sizes):
        sys.exit("--layout-sizes must be among --sizes (one GPU and SP come from phase (b))")
    store = dist.TCPStore("127.0.0.1", 0, options.world + 1, is_master=True, wait_for_workers=False)  # a free port
    start = time.perf_counter()
    mp.spawn(rank_main, args=(store.port, options), nprocs=options.world)
    print(f"wrote {results_path()} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
