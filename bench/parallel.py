"""Tensor and sequence parallelism on 2 GPUs (NCCL; `--world 4` / `8` for more), in one run of a few minutes:

(a) correctness: logits of TP=2 and SP=2 against one GPU, on the `small` preset in bf16;
(b) prefill of an 8B-shaped model (--layers, default 2) at 128K, 512K and 1M tokens, SP=1 (one
    GPU) against SP=2 (ring attention), per layer, with each GPU's attention TFLOP/s against the
    single-GPU cuDNN SDPA rate measured in the same run, and the ring's exposed communication;
(c) one decode step over a 1M-token KV cache split across the 2 GPUs against one GPU;
(d) prefill attention alone (one layer's causal attention, no model) at the same sizes: one GPU,
    then SP=2 as ring attention and as Ulysses (all-to-all over heads, ulysses.py) on identical
    local rows: the slowest rank's time, per-GPU TFLOP/s against the one-GPU rate of the same
    kernel, and the communication (the ring's exposed part; Ulysses' two all-to-alls).

Run from the repo root on a 2-GPU machine: `python3 bench/parallel.py` (`--sizes 131072 524288`
for a shorter run, `--skip-correctness --skip-scaling` for (d) alone). On 4 or 8 GPUs (issue 6):
`--world 4` runs SP=4 everywhere and checks TP=4, SP=4 and TP 2 x SP 2 in (a). Prints tables;
writes $OUT/parallel.json if OUT is set, else bench/results/parallel.json, after every phase (a
cut-off run still leaves what it measured).
`--dry-run` runs every phase on the CPU (gloo, a tiny model, small sizes) to check the script
itself before spending GPU time; its numbers mean nothing.

bf16 tolerance of (a). Each rank reorders bf16 sums (TP all-reduces, log-sum-exp merges of
attention partials in float32, a different attention kernel), which moves logits by about as much
as bf16 itself does. So a parallel run must be about as close to the float32 truth (one GPU,
float32, the reference attention) as the single-GPU bf16 run is: mean |logit - fp32| at most 1.5x
single-GPU bf16's, max at most 2x + 0.05 (a maximum over ~16M logits of std ~4 varies more between
two equally good runs than a mean does). A wrong head, stripe, mask or merge moves logits by O(1)
and fails both by a wide margin.

SP=1 runs the same sequence-parallel attention backend on one GPU (a one-rank ring: the fused
causal kernel with log-sum-exp and the paged-cache writes), so the speedup compares like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/parallel.py`

from report import print_table  # noqa: E402  (bench/ is on sys.path when a script runs)

from model_folder.hf_config import load_architecture  # noqa: E402
from model_shards.llama import LlamaForCausalLM  # noqa: E402
from model_shards.make_model import make_model  # noqa: E402
from model_shards.parallel.groups import ParallelGroup, ParallelLayout, build_layout  # noqa: E402
from model_shards.parallel.lse_attention import (  # noqa: E402
    KERNELS,
    attention_with_lse,
    kernel_matches_reference,
    reference_attention,
    select_kernel,
)
from model_shards.parallel.ring import ring_attention  # noqa: E402
from model_shards.parallel.sp_attention import (  # noqa: E402
    SequenceParallelBackend,
    build_local_batch,
)
from model_shards.parallel.sp_plan import SequenceParallelPlan, StepSequence  # noqa: E402
from model_shards.parallel.ulysses import (  # noqa: E402
    HeadSplit,
    SequenceShards,
    gather_heads,
    scatter_heads,
    ulysses_attention,
)

BLOCK_SIZE = 256  # SP=2: 128 positions of every block per GPU


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int


LLAMA3_8B = Shape(heads=32, kv_heads=8, head_dim=128, hidden=4096, ffn=14336, vocab=128256)
DRY_RUN = Shape(heads=4, kv_heads=2, head_dim=16, hidden=64, ffn=128, vocab=1024)


def results_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "parallel.json" if out else Path(__file__).resolve().parent / "results" / "parallel.json"


# --- timing helpers ------------------------------------------------------------------------------


class HostEvent:
    """torch.cuda.Event's timing interface on the host clock (for --dry-run on the CPU)."""

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, other: HostEvent) -> float:
        return (other.time - self.time) * 1e3  # milliseconds, as CUDA events report


def new_event():
    return torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else HostEvent()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, repeats: int = 1) -> float:
    """Seconds per call on the GPU clock (CUDA events), after the host waited for the GPU."""
    synchronize()
    start, stop = new_event(), new_event()
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    synchronize()
    return start.elapsed_time(stop) / 1e3 / repeats


class LayerTimer:
    """CUDA events around every decoder layer and its attention (forward hooks)."""

    def __init__(self, model: LlamaForCausalLM):
        self.events: dict[str, list] = {"layer": [], "attention": []}
        for layer in model.layers:
            self._hook(layer, "layer")
            self._hook(layer.self_attn, "attention")

    def _hook(self, module, kind: str) -> None:
        def before(*_):
            self.events[kind].append([new_event(), new_event()])
            self.events[kind][-1][0].record()

        def after(*_):
            self.events[kind][-1][1].record()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def reset(self) -> None:
        self.events = {"layer": [], "attention": []}

    def seconds(self, kind: str) -> list[float]:
        synchronize()
        return [start.elapsed_time(stop) / 1e3 for start, stop in self.events[kind]]


# --- models ---------------------------------------------------------------------------------------


def shaped_model(shape: Shape, layers: int, device: torch.device, backend) -> LlamaForCausalLM:
    """A Llama with `shape` and `layers` layers, random weights made on the device (no folder)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape.vocab,
              "hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_hidden_layers": layers,
              "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
              "max_position_embeddings": 1 << 21, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    with tempfile.TemporaryDirectory(prefix="longctx-bench-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        arch = load_architecture(folder)
    model = LlamaForCausalLM(arch, torch.bfloat16, device, backend)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.fill_(1.0)  # norm weights
            else:
                std = 1.0 if "embed" in name else parameter.shape[1] ** -0.5
                parameter.normal_(0.0, std)
    return model.eval()


def set_backend(model: LlamaForCausalLM, backend) -> None:
    for layer in model.layers:
        layer.self_attn.backend = backend


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


def causal_flops(shape: Shape, length: int) -> float:
    """QK^T and PV over the causal half: 2 matmuls x 2 flops x L(L+1)/2 pairs x heads x head_dim."""
    return 4.0 * shape.heads * shape.head_dim * length * (length + 1) / 2


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


# --- (b) prefill and (c) decode -------------------------------------------------------------------


class NoExchange(ParallelGroup):
    """The SP group with the ring's sends and receives left out: the same kernels on the same
    shapes (equal pieces), to measure how much communication the ring leaves exposed."""

    def start_ring_exchange(self, send, recv) -> list:
        return []


def prefill(model: LlamaForCausalLM, timer: LayerTimer, sp: ParallelGroup, length: int, device) -> tuple[dict, object]:
    shape = shape_of(model)
    num_blocks = -(-(length + 64) // BLOCK_SIZE)  # room for the decode steps after it
    cache = model.allocate_kv_cache(num_blocks, BLOCK_SIZE // sp.size)
    tokens = torch.randint(10, shape.vocab - 10, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    host_start = time.perf_counter()
    batch = build_local_batch([StepSequence(list(range(num_blocks)), 0, length)], [tokens], BLOCK_SIZE, sp, device,
                              sequence_parallel=True)
    plan_s = time.perf_counter() - host_start
    timer.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = cuda_time(lambda: model(batch.input_ids, batch.metadata.positions, batch.metadata, cache))
    layers, attention = timer.seconds("layer"), timer.seconds("attention")
    flops_per_gpu = causal_flops(shape, length) / sp.size
    row = {"tokens": length, "sp": sp.size, "total_s": seconds, "host_plan_s": plan_s,
           "layer_s": layers, "attention_s": attention,
           "attention_TFLOPs_per_gpu": [flops_per_gpu / a / 1e12 for a in attention],
           "peak_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}
    return row, (cache, tokens, num_blocks)


def shape_of(model: LlamaForCausalLM) -> Shape:
    arch = model.arch
    return Shape(arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.hidden_size,
                 arch.intermediate_size, arch.vocab_size)


def decode(model: LlamaForCausalLM, timer: LayerTimer, sp: ParallelGroup, state, length: int, device,
           steps: int = 8) -> dict:
    """Decode steps right after the prefill, over its cache: the medians of the host wall time of
    a whole step (metadata included), the GPU time of its forward + logits, and its attention."""
    cache, tokens, num_blocks = state
    table, samples = list(range(num_blocks)), {"step": [], "forward": [], "attention": []}
    for step in range(steps):
        tokens.append(100 + step)
        synchronize()
        host_start = time.perf_counter()
        step_sequence = StepSequence(table, length + step, 1)
        batch = build_local_batch([step_sequence], [tokens], BLOCK_SIZE, sp, device, sequence_parallel=True)
        timer.reset()
        start, stop = new_event(), new_event()
        start.record()
        hidden = model(batch.input_ids, batch.metadata.positions, batch.metadata, cache)
        if sp.rank == 0:
            model.compute_logits(hidden[-1:])
        stop.record()
        synchronize()
        if step >= 2:  # the first steps warm up the decode shapes
            samples["step"].append(time.perf_counter() - host_start)
            samples["forward"].append(start.elapsed_time(stop) / 1e3)
            samples["attention"].append(sum(timer.seconds("attention")))
    shape = shape_of(model)
    kv_bytes = 2 * len(model.layers) * length * shape.kv_heads * shape.head_dim * 2 / sp.size
    median = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
    return {"context": length, "sp": sp.size, "step_s": median["step"], "forward_s": median["forward"],
            "attention_s": median["attention"], "kv_GB_per_gpu": kv_bytes / 1e9,
            "kv_GBps_per_gpu": kv_bytes / median["attention"] / 1e9}


def exposed_communication(shape: Shape, sp: ParallelGroup, length: int, kernel: str, device) -> dict:
    """One layer's ring attention with and without its sends/receives, on this rank's shapes."""
    plan = SequenceParallelPlan.build([StepSequence(list(range(-(-length // BLOCK_SIZE))), 0, length)], BLOCK_SIZE,
                                      sp.rank, sp.size)
    rows = plan.num_ring_rows
    q = torch.randn(rows, shape.heads, shape.head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(rows, shape.kv_heads, shape.head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    silent = NoExchange(sp.rank, sp.size, sp.ranks, sp.process_group, sp.device)
    run = lambda group: ring_attention(q, k, v, plan, group, shape.head_dim ** -0.5, KERNELS[kernel])  # noqa: E731
    with_comm, compute_only = cuda_time(lambda: run(sp)), cuda_time(lambda: run(silent))
    block = torch.stack([k, v])
    incoming = torch.empty_like(block)
    transfer = cuda_time(lambda: [r.wait() for r in sp.start_ring_exchange(block, incoming)])
    return {"tokens": length, "ring_s": with_comm, "compute_only_s": compute_only,
            "exposed_comm_s": max(0.0, with_comm - compute_only), "kv_block_MB": block.numel() * 2 / 1e6,
            "kv_block_transfer_s": transfer, "p2p_GBps": block.numel() * 2 / transfer / 1e9}


# --- (d) prefill attention alone: ring against Ulysses ------------------------------------------


def attention_modes(rank: int, device: torch.device, options, checkpoint) -> dict:
    """One layer's causal attention over a whole prompt, per size: on one GPU, then on SP=2 as the
    ring and as Ulysses. `checkpoint(result)` saves what is measured after every size."""
    sp = build_layout(1, options.world, device).sp
    result: dict = {"rows": [], "large_shape_checks": []}
    lengths = [min(16384, min(options.sizes))] + options.sizes  # a warm-up (kernels, allocator, NCCL) first
    for index, length in enumerate(lengths):
        single = single_gpu_attention(rank, options.shape, length, device, result)
        rows = [single] + [mode(options.shape, sp, length, device, options, result)
                           for mode in (ring_mode, ulysses_mode)]
        if index > 0 and rank == 0:
            result["rows"] += [with_rates(row, single, options.shape) for row in rows]
        checkpoint(result)
    return result


def random_qkv(shape: Shape, rows: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rows, H, D), k/v (rows, KV, D) in bf16."""
    return tuple(torch.randn(rows, heads, shape.head_dim, device=device, dtype=torch.bfloat16)
                 for heads in (shape.heads, shape.kv_heads, shape.kv_heads))


def single_gpu_attention(rank: int, shape: Shape, length: int, device, result: dict) -> dict | None:
    """Rank 0 alone: the fused causal kernel over the whole prompt (the other rank waits)."""
    row = None
    if rank == 0:
        name = checked_kernel(shape, length, device, result)
        q, k, v = random_qkv(shape, length, device)
        seconds = cuda_time(lambda: attention_with_lse(KERNELS[name], q, k, v, shape.head_dim ** -0.5, True))
        row = {"mode": "1 GPU", "tokens": length, "gpus": 1, "kernel": name, "time_s": seconds, "comm_s": None}
        del q, k, v
        release_memory(device)
    dist.barrier()
    return row


def ring_mode(shape: Shape, sp: ParallelGroup, length: int, device, options, result: dict) -> dict:
    """Ring attention over the zigzag split; its exposed communication (time with the exchanges
    minus time without) up to --comm-max."""
    plan = SequenceParallelPlan.build([StepSequence(list(range(-(-length // BLOCK_SIZE))), 0, length)], BLOCK_SIZE,
                                      sp.rank, sp.size)
    name = agreed(sp, checked_kernel(shape, plan.num_ring_rows, device, result))
    q, k, v = random_qkv(shape, plan.num_ring_rows, device)
    def run(group: ParallelGroup):
        return ring_attention(q, k, v, plan, group, shape.head_dim ** -0.5, KERNELS[name])
    seconds = slowest(sp, lambda: run(sp))
    comm = None
    if length <= options.comm_max:
        silent = NoExchange(sp.rank, sp.size, sp.ranks, sp.process_group, sp.device)
        comm = max(0.0, seconds - slowest(sp, lambda: run(silent)))
    release_memory(device)
    return {"mode": "ring", "tokens": length, "gpus": sp.size, "kernel": name, "time_s": seconds, "comm_s": comm}


def ulysses_mode(shape: Shape, sp: ParallelGroup, length: int, device, options, result: dict) -> dict:
    """Ulysses on the ring's rows (identical inputs); its communication: the two all-to-alls
    with the reorders between position and rank order, timed alone."""
    shards, heads = SequenceShards.zigzag(length, sp.size), HeadSplit.of(shape.heads, shape.kv_heads, sp)
    local_heads, local_kv_heads = heads.width(sp.rank)
    local_shape = replace(shape, heads=local_heads, kv_heads=local_kv_heads)  # what the kernel sees
    name = agreed(sp, checked_kernel(local_shape, length, device, result))
    q, k, v = random_qkv(shape, shards.rows(sp.rank), device)
    seconds = slowest(sp, lambda: ulysses_attention(q, k, v, shards, sp, shape.head_dim ** -0.5, KERNELS[name]))
    comm = slowest(sp, lambda: gather_heads(scatter_heads(q, k, v, shards, heads, sp)[0], shards, sp))
    release_memory(device)
    return {"mode": "ulysses", "tokens": length, "gpus": sp.size, "kernel": name, "time_s": seconds, "comm_s": comm}


def checked_kernel(shape: Shape, rows: int, device, result: dict) -> str:
    """The prefill kernel chosen for `shape` (the heads one GPU attends with), replaced by
    FlashAttention-2 if it fails the large-shape check at `rows` queries (see large_shape_check)."""
    name = select_kernel(device, torch.bfloat16, shape.heads, shape.kv_heads, shape.head_dim)[0]
    if rows < 1 << 18 or device.type != "cuda":
        return name
    for candidate in dict.fromkeys([name, "flash"]):
        check = large_shape_check(candidate, shape, rows, device)
        result["large_shape_checks"].append(check)
        if check["ok"]:
            return candidate
    return "flash"  # failed too: the run reports its error rather than silently using the reference


def agreed(group: ParallelGroup, name: str) -> str:
    """Rank 0's kernel choice on every rank: a collective op must run the same kernel everywhere."""
    names = list(KERNELS)
    return names[group.broadcast_ints([names.index(name)] if group.rank == 0 else None, 1)[0]]


def slowest(group: ParallelGroup, fn) -> float:
    """Seconds of one call of a collective `fn`, started together (barrier), on the slowest rank."""
    dist.barrier(group=group.process_group)
    seconds = cuda_time(fn)
    return max(group.all_gather(torch.tensor([seconds], dtype=torch.float64, device=group.device)).tolist())


def release_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def with_rates(row: dict, single: dict, shape: Shape) -> dict:
    """The row with per-GPU TFLOP/s, that rate against the one-GPU rate, and the speedup."""
    rate = causal_flops(shape, row["tokens"]) / row["gpus"] / row["time_s"] / 1e12
    single_rate = causal_flops(shape, single["tokens"]) / single["time_s"] / 1e12
    return {**row, "TFLOPs_per_gpu": rate, "vs_1gpu_rate": rate / single_rate,
            "speedup": single["time_s"] / row["time_s"]}


def print_attention_modes(rows: list[dict]) -> None:
    table = [{"tokens": r["tokens"], "mode": r["mode"], "GPUs": r["gpus"], "kernel": r["kernel"],
              "time s": f"{r['time_s']:.4g}", "TFLOP/s per GPU": f"{r['TFLOPs_per_gpu']:.4g}",
              "of 1-GPU rate": f"{100 * r['vs_1gpu_rate']:.0f}%", "speedup": f"{r['speedup']:.2f}x",
              "comm s": "-" if r["comm_s"] is None else f"{r['comm_s']:.4g}"} for r in rows]
    print_table("prefill attention alone, one layer (slowest rank; comm: ring exposed, Ulysses all-to-alls)",
                table)


# --- the run --------------------------------------------------------------------------------------


def scaling(rank: int, device: torch.device, options, checkpoint) -> dict:
    """(b) and (c); `checkpoint(result)` saves what is measured so far after every run."""
    layout = build_layout(1, options.world, device)
    single = ParallelGroup(0, 1, (rank,), None, device)
    model = shaped_model(options.shape, options.layers, device, SequenceParallelBackend(single))
    timer, kernels = LayerTimer(model), {}
    result: dict = {"prefill": [], "decode": [], "exposed_comm": [], "errors": [], "large_shape_checks": []}
    shape = options.shape
    best = select_kernel(device, torch.bfloat16, shape.heads, shape.kv_heads, shape.head_dim)[0]
    if device.type == "cuda" and best == "reference":  # it materializes scores: 1M tokens would never fit
        result["errors"].append({"error": "no fused attention kernel with log-sum-exp matched the reference"})
        return result
    lengths = [min(16384, min(options.sizes))] + options.sizes  # a warm-up (kernels, allocator, NCCL) first
    for index, length in enumerate(lengths):
        for group in (single, layout.sp) if layout.sp.size > 1 else (single,):  # --world 1: the baseline only
            if group.size == 1 and rank != 0:
                dist.barrier()  # one GPU: the other ranks wait
                continue
            run_one(model, timer, group, length, device, measured=index > 0, options=options, result=result,
                    kernels=kernels)
            if group.size == 1:
                dist.barrier()
            checkpoint(result)
        if index > 0 and length <= options.comm_max:
            result["exposed_comm"].append(exposed_communication(options.shape, layout.sp, length,
                                                                kernels[layout.sp.size], device))
    return result


def large_shape_check(name: str, shape: Shape, rows: int, device) -> dict:
    """Does kernel `name` still match the reference with `rows` queries (over 16 keys) and over
    `rows` keys (for 16 queries)? Fused kernels have had 32-bit offset bugs past 2^31 elements
    (a 512K-token q of 32 x 128 is exactly 2^31) that the small probe cannot see; this costs
    milliseconds, where checking a causal call at that size would cost seconds."""
    kernel, scale, few = KERNELS[name], shape.head_dim ** -0.5, 16
    generator = torch.Generator(device=device).manual_seed(0)
    def tensor(count, heads):
        return torch.randn(count, heads, shape.head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    big_q, small_k, small_v = tensor(rows, shape.heads), tensor(few, shape.kv_heads), tensor(few, shape.kv_heads)
    spread = torch.arange(0, rows, max(1, rows // 64), device=device)  # rows across the tensor, and its end
    picked = torch.cat([spread, torch.arange(rows - 8, rows, device=device)])
    out = kernel(big_q, small_k, small_v, scale, False)[0][picked]
    errors = [(out.float() - reference_attention(big_q[picked], small_k, small_v, scale, False)[0].float()).abs().max()]
    del big_q
    small_q, big_k, big_v = tensor(few, shape.heads), tensor(rows, shape.kv_heads), tensor(rows, shape.kv_heads)
    out, lse = kernel(small_q, big_k, big_v, scale, False)
    ref_out, ref_lse = reference_attention(small_q, big_k, big_v, scale, False)
    errors += [(out.float() - ref_out.float()).abs().max(), (lse - ref_lse).abs().max()]
    worst = max(e.item() for e in errors)
    return {"kernel": name, "rows": rows, "max_error": worst, "ok": worst < 0.05}


def checked_kernels(group: ParallelGroup, length: int, device, options, result: dict, kernels: dict) -> tuple:
    """(prefill, decode) kernel names for this run: those chosen before (None: the backend's
    probe chooses), each replaced by FlashAttention-2 if it fails the large-shape check here."""
    chosen = [kernels.get(group.size), kernels.get(("decode", group.size))]
    rows = length // group.size
    if rows < 1 << 18 or device.type != "cuda":
        return tuple(chosen)
    for index, name in enumerate(chosen):
        for candidate in dict.fromkeys([name, "flash"] if name else []):
            check = large_shape_check(candidate, options.shape, rows, device)
            result["large_shape_checks"].append(check)
            if check["ok"]:
                chosen[index] = candidate
                break
    return tuple(chosen)


def run_one(model, timer, group: ParallelGroup, length: int, device, measured: bool, options, result: dict,
            kernels: dict) -> None:
    """One prefill (and, at the largest size, its decode steps). A fused kernel that fails at
    this size (a limit the small probe cannot see) is recorded and replaced by FlashAttention-2;
    every rank of the ring sees the same shapes, so they fail and retry together."""
    backend = SequenceParallelBackend(group, *checked_kernels(group, length, device, options, result, kernels))
    for attempt in range(2):
        set_backend(model, backend)
        try:
            row, state = prefill(model, timer, group, length, device)
            break
        except RuntimeError as error:
            result["errors"].append({"tokens": length, "sp": group.size, "kernel": backend.kernel_name,
                                     "error": str(error).splitlines()[0][:300]})
            torch.cuda.empty_cache()
            if attempt or backend.kernel_name == "flash":
                raise
            backend = SequenceParallelBackend(group, "flash", backend.decode_kernel_name)
    kernels[group.size] = row["kernel"] = backend.kernel_name
    kernels[("decode", group.size)] = backend.decode_kernel_name
    if measured and length == max(options.sizes):
        result["decode"].append(decode(model, timer, group, state, length, device))
        result["decode"][-1]["kernel"] = backend.decode_kernel_name
    del state
    torch.cuda.empty_cache()
    if measured and group.rank == 0 and group.world_rank(0) == 0:
        result["prefill"].append(row)
        print_prefill(row, flush=True)


def print_prefill(row: dict, flush: bool = False) -> None:
    per_layer = ", ".join(f"{t:.2f}" for t in row["layer_s"])
    rates = ", ".join(f"{r:.0f}" for r in row["attention_TFLOPs_per_gpu"])
    print(f"prefill {row['tokens']:>8} tokens sp={row['sp']}: {row['total_s']:7.2f} s  layers [{per_layer}] s  "
          f"attention TFLOP/s per GPU [{rates}]  kernel {row['kernel']}  peak {row['peak_GiB']:.1f} GiB", flush=flush)


def summarize(results: dict) -> None:
    prefill = {(r["tokens"], r["sp"]): r for r in results.get("scaling", {}).get("prefill", [])}
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
    decode = {r["sp"]: r for r in results.get("scaling", {}).get("decode", [])}
    sp = max(decode, default=1)
    if 1 in decode and sp > 1:
        speedup = {name: decode[1][name + "_s"] / decode[sp][name + "_s"] for name in ("step", "forward", "attention")}
        results["decode_speedup"] = speedup
        print(f"decode over {decode[1]['context']} tokens, 1 -> {sp} GPUs (goal at 2: >= 1.8x): "
              + ", ".join(f"{name} {decode[1][name + '_s'] * 1e3:.2f} -> {decode[sp][name + '_s'] * 1e3:.2f} ms "
                          f"({speedup[name]:.2f}x)" for name in speedup)
              + f"; KV read {decode[1]['kv_GBps_per_gpu']:.0f} / {decode[sp]['kv_GBps_per_gpu']:.0f} GB/s per GPU")
    for comm in results.get("scaling", {}).get("exposed_comm", []):
        print(f"ring at {comm['tokens']} tokens (rank 0): {comm['ring_s']:.3f} s with comm, "
              f"{comm['compute_only_s']:.3f} s compute only, exposed {comm['exposed_comm_s'] * 1e3:.1f} ms; "
              f"KV block {comm['kv_block_MB']:.0f} MB at {comm['p2p_GBps']:.0f} GB/s")
    if results.get("attention_modes", {}).get("rows"):
        print_attention_modes(results["attention_modes"]["rows"])


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
    if rank == 0:
        results["kernels_matching_reference"] = kernel_report(device, options.shape)
        results["single_gpu_sdpa_TFLOPs"] = reference_rates(device, options.shape, options.reference_length)
        print(json.dumps({k: results[k] for k in ("gpu", "torch", "kernels_matching_reference",
                                                  "single_gpu_sdpa_TFLOPs")}), flush=True)
    dist.barrier()
    if not options.skip_correctness:
        results["correctness"] = correctness(rank, device, "tiny" if options.dry_run else "small", world)
        save(rank, results)
        if rank == 0:
            print(json.dumps({"correctness": results["correctness"]}, indent=1), flush=True)
    if not options.skip_scaling:
        results["scaling"] = scaling(rank, device, options,
                                     lambda partial: save(rank, {**results, "scaling": partial}))
    if options.world > 1:  # ring against Ulysses needs two ranks at least
        results["attention_modes"] = attention_modes(rank, device, options,
                                                     lambda partial: save(rank, {**results, "attention_modes": partial}))
    summarize(results) if rank == 0 else None
    save(rank, results)
    dist.barrier()
    dist.destroy_process_group()


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--comm-max", type=int, default=524288, help="measure exposed ring communication up to this")
    parser.add_argument("--reference-length", type=int, default=131072, help="tokens of the cuDNN SDPA reference call")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true", help="skip (b) and (c): model prefill and decode")
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny model and sizes: checks the script")
    parser.add_argument("--world", type=int, default=2,
                        help="GPUs: SP over all of them (4 and 8: issue 6's run; 1: the single-GPU baseline alone)")
    options = parser.parse_args()
    options.shape = LLAMA3_8B
    if options.dry_run:
        options.shape, options.sizes, options.comm_max, options.reference_length = DRY_RUN, [512, 1024], 1024, 256
    elif torch.cuda.device_count() < options.world:
        sys.exit(f"needs {options.world} GPUs, found {torch.cuda.device_count()}")
    store = dist.TCPStore("127.0.0.1", 0, options.world + 1, is_master=True, wait_for_workers=False)  # a free port
    start = time.perf_counter()
    mp.spawn(rank_main, args=(store.port, options), nprocs=options.world)
    print(f"wrote {results_path()} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
