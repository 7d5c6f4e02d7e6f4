"""Phases (b) and (c) of bench/parallel.py, and the prefill / decode measurements phase (e) shares.

(b) The prefill of an 8B-shaped model (--layers) at every size, one GPU against SP over all of
    them. Every rank reports every layer: when it started and ended on a clock that starts at a
    barrier (a late rank shows as a late start), its attention, each ring step's kernel and its
    wait on the exchange, the memory it allocated (peak, allocator retries, cudaMalloc/cudaFree
    calls) and the GPU's SM clock, power, temperature and throttle reasons over it. One run
    tells whether a slow layer waited (a peer late), ran slow kernels (clocks, throttling) or
    fought the allocator. GPUs cool down to near their starting temperature before each long run,
    so no run inherits the heat of the one before it.
(c) Decode steps after each prefill, over its cache; then over a 1M-token cache of a deeper model
    (--decode-layers, the cache left as zeros: no prefill needed, timings do not depend on the
    values), where the per-step costs outside the layers (batch metadata, embedding, LM head)
    weigh as they do in a real model.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from model_shards.llama import LlamaForCausalLM
from model_shards.parallel.groups import ParallelGroup, build_layout
from model_shards.parallel.lse_attention import KERNELS, select_kernel
from model_shards.parallel.ring import ring_attention
from model_shards.parallel.sp_attention import build_local_batch
from model_shards.parallel.sp_plan import SequenceParallelPlan, StepSequence
from parallel_attention_modes import NoExchange
from parallel_common import (BLOCK_SIZE, causal_flops, cuda_time, large_shape_check, release_memory, set_backend,
                             shape_of, shaped_model)
from parallel_probes import GpuSampler, LayerProbe, TracedBackend, TracedGroup, new_event, synchronize
from report import print_table



class Bench:
    """What one rank's measurements share: the device, the options, the GPU sampler, and the
    temperature the GPU started at."""

    def __init__(self, rank: int, device: torch.device, options):
        self.rank, self.device, self.options = rank, device, options
        self.sampler = GpuSampler(device)
        self.start_celsius = self.sampler.temperature()

    def cool_down(self) -> float:
        """Wait until this GPU is within 5 C of its starting temperature (at most --cooldown-s),
        then for every rank; seconds waited."""
        start = time.perf_counter()
        while time.perf_counter() - start < self.options.cooldown_s and self._hot():
            time.sleep(0.5)
        dist.barrier()
        return time.perf_counter() - start

    def _hot(self) -> bool:
        now = self.sampler.temperature()
        return now is not None and self.start_celsius is not None and now > self.start_celsius + 5

    def traced_model(self, layers: int, group: ParallelGroup, tp: ParallelGroup | None = None):
        """(model, probe, traced SP group) for `layers` layers of the shape; SP attention over `group`."""
        model = shaped_model(self.options.shape, layers, self.device, "torch_sdpa", tp)
        probe = LayerProbe(model, self.device, self.sampler)
        return model, probe, TracedGroup.of(group, probe)


# --- one prefill, its decode steps ------------------------------------------------------------------


def measure_prefill(model: LlamaForCausalLM, probe: LayerProbe, sp: ParallelGroup, together: ParallelGroup,
                    length: int, device) -> tuple[dict, tuple]:
    """One prefill of `length` tokens; `together`: every rank in this run (they start at a
    barrier). The row holds every rank's layers (rank 0 gets them all)."""
    shape, gpus = shape_of(model), together.size
    num_blocks = -(-(length + 64) // BLOCK_SIZE)  # room for the decode steps after it
    cache = model.allocate_kv_cache(num_blocks, BLOCK_SIZE // sp.size)
    tokens = torch.randint(10, shape.vocab - 10, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    host_start = time.perf_counter()
    batch = build_local_batch([StepSequence(list(range(num_blocks)), 0, length)], [tokens], BLOCK_SIZE, sp, device,
                              sequence_parallel=True)
    plan_s = time.perf_counter() - host_start
    if together.size > 1:
        dist.barrier(group=together.process_group)
    probe.start()
    seconds = cuda_time(lambda: model(batch.input_ids, batch.metadata.positions, batch.metadata, cache))
    ranks = together.all_gather_object(probe.rows(together.world_rank(together.rank)))
    mine = ranks[0]  # rank 0's layers, as the summary lines report them
    attention = [layer["attention_s"] for layer in mine]
    row = {"tokens": length, "sp": sp.size, "tp": gpus // sp.size, "gpus": gpus, "total_s": seconds,
           "host_plan_s": plan_s, "layer_s": [layer["layer_s"] for layer in mine], "attention_s": attention,
           "attention_TFLOPs_per_gpu": [causal_flops(shape, length) / gpus / a / 1e12 for a in attention],
           "peak_GiB": max((layer.get("peak_GiB", 0.0) for rank in ranks for layer in rank), default=0.0),
           "ranks": ranks}
    return row, (cache, tokens, num_blocks)


def measure_decode(model: LlamaForCausalLM, probe: LayerProbe, sp: ParallelGroup, together: ParallelGroup, state,
                   length: int, device, steps: int = 8) -> dict:
    """Decode steps right after a prefill, over its cache: the medians of the host wall time of
    a whole step (metadata included), the GPU time of its forward + logits, and its attention;
    the last step's per-layer steps on every rank."""
    cache, tokens, num_blocks = state
    table, samples = list(range(num_blocks)), {"step": [], "forward": [], "attention": []}
    for step in range(steps):
        tokens.append(100 + step)
        synchronize()
        host_start = time.perf_counter()
        batch = build_local_batch([StepSequence(table, length + step, 1)], [tokens], BLOCK_SIZE, sp, device,
                                  sequence_parallel=True)
        probe.start()
        start, stop = new_event(), new_event()
        start.record()
        hidden = model(batch.input_ids, batch.metadata.positions, batch.metadata, cache)
        if sp.rank == 0:  # the sampled row lives on SP rank 0; its TP group computes the logits
            model.compute_logits(hidden[-1:])
        stop.record()
        synchronize()
        if step >= 2:  # the first steps warm up the decode shapes
            samples["step"].append(time.perf_counter() - host_start)
            samples["forward"].append(start.elapsed_time(stop) / 1e3)
            samples["attention"].append(sum(probe.seconds("attention")))
    shape, gpus = shape_of(model), together.size
    kv_bytes = 2 * len(model.layers) * length * shape.kv_heads * shape.head_dim * 2 / gpus
    median = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
    return {"context": length, "sp": sp.size, "tp": gpus // sp.size, "gpus": gpus, "layers": len(model.layers),
            "step_s": median["step"], "forward_s": median["forward"], "attention_s": median["attention"],
            "kv_GB_per_gpu": kv_bytes / 1e9, "kv_GBps_per_gpu": kv_bytes / median["attention"] / 1e9,
            "last_step_ranks": together.all_gather_object(probe.rows(together.world_rank(together.rank)))}


# --- (b) and (c) ----------------------------------------------------------------------------------


def scaling(bench: Bench, checkpoint) -> dict:
    """`checkpoint(result)` saves what is measured so far after every run."""
    rank, device, options = bench.rank, bench.device, bench.options
    layout = build_layout(1, options.world, device)
    single = ParallelGroup(0, 1, (rank,), None, device)
    result: dict = {"prefill": [], "decode": [], "exposed_comm": [], "errors": [], "large_shape_checks": [],
                    "cooldown_s": [], "gpu_sampler": bench.sampler.error or "ok"}
    shape = options.shape
    if device.type == "cuda" and select_kernel(device, torch.bfloat16, shape.heads, shape.kv_heads,
                                               shape.head_dim)[0] == "reference":  # 1M tokens would never fit
        result["errors"].append({"error": "no fused attention kernel with log-sum-exp matched the reference"})
        return result
    model, probe, _ = bench.traced_model(options.layers, single)
    kernels: dict = {}
    lengths = [min(16384, min(options.sizes))] + options.sizes  # a warm-up (kernels, allocator, NCCL) first
    for index, length in enumerate(lengths):
        for group in (single, layout.sp) if layout.sp.size > 1 else (single,):  # --world 1: the baseline only
            if length >= options.long_run:
                result["cooldown_s"].append(bench.cool_down())
            if group.size == 1 and rank != 0:
                dist.barrier()  # one GPU: the other ranks wait
                continue
            run_one(model, probe, group, length, bench, measured=index > 0, result=result, kernels=kernels)
            if group.size == 1:
                dist.barrier()
            checkpoint(result)
        if index > 0 and length <= options.comm_max and layout.sp.size > 1:
            result["exposed_comm"].append(exposed_communication(shape, layout.sp, length, kernels[layout.sp.size],
                                                                device))
    del model
    release_memory(device)
    result["deep_decode"] = deep_decode(bench, layout.sp, single, kernels)
    return result


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


def run_one(model, probe: LayerProbe, group: ParallelGroup, length: int, bench: Bench, measured: bool,
            result: dict, kernels: dict) -> None:
    """One prefill and its decode steps. A fused kernel that fails at this size (a limit the
    small probe cannot see) is recorded and replaced by FlashAttention-2; every rank of the ring
    sees the same shapes, so they fail and retry together."""
    device, traced = bench.device, TracedGroup.of(group, probe)
    names = checked_kernels(group, length, device, bench.options, result, kernels)
    backend = TracedBackend(traced, *names)
    for attempt in range(2):
        set_backend(model, backend)
        try:
            row, state = measure_prefill(model, probe, traced, traced, length, device)
            break
        except RuntimeError as error:
            result["errors"].append({"tokens": length, "sp": group.size, "kernel": backend.kernel_name,
                                     "error": str(error).splitlines()[0][:300]})
            release_memory(device)
            if attempt or backend.kernel_name == "flash":
                raise
            backend = TracedBackend(traced, "flash", backend.decode_kernel_name)
    kernels[group.size] = row["kernel"] = backend.kernel_name
    kernels[("decode", group.size)] = backend.decode_kernel_name
    decode = measure_decode(model, probe, traced, traced, state, length, device) if measured else None
    del state
    release_memory(device)
    if measured and group.rank == 0 and group.world_rank(0) == 0:
        result["prefill"].append(row)
        result["decode"].append({**decode, "kernel": backend.decode_kernel_name})
        print_prefill(row, bench.options.long_run)


def deep_decode(bench: Bench, sp: ParallelGroup, single: ParallelGroup, kernels: dict) -> list[dict]:
    """Decode over a --decode-context cache (zeros) of a --decode-layers model: one GPU, then SP."""
    rows, options, device = [], bench.options, bench.device
    length = options.decode_context
    for group in (single, sp) if sp.size > 1 else (single,):
        if group.size == 1 and bench.rank != 0:
            dist.barrier()
            continue
        model, probe, traced = bench.traced_model(options.decode_layers, group)
        set_backend(model, TracedBackend(traced, kernels.get(group.size), kernels.get(("decode", group.size))))
        num_blocks = -(-(length + 64) // BLOCK_SIZE)
        state = (model.allocate_kv_cache(num_blocks, BLOCK_SIZE // group.size), [11] * length, num_blocks)
        row = measure_decode(model, probe, traced, traced, state, length, device)
        del model, state
        release_memory(device)
        if group.size == 1:
            dist.barrier()
        rows.append(row)
    return rows if bench.rank == 0 else []


def exposed_communication(shape, sp: ParallelGroup, length: int, kernel: str, device) -> dict:
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


# --- printing ---------------------------------------------------------------------------------------


def print_prefill(row: dict, long_run: int) -> None:
    per_layer = ", ".join(f"{t:.2f}" for t in row["layer_s"])
    rates = ", ".join(f"{r:.0f}" for r in row["attention_TFLOPs_per_gpu"])
    print(f"prefill {row['tokens']:>8} tokens sp={row['sp']} tp={row['tp']}: {row['total_s']:7.2f} s  layers "
          f"[{per_layer}] s  attention TFLOP/s per GPU [{rates}]  kernel {row['kernel']}  peak {row['peak_GiB']:.1f} "
          f"GiB", flush=True)
    if row["tokens"] >= long_run:
        print_layers(f"  every rank's layers at {row['tokens']} tokens, sp={row['sp']} tp={row['tp']}", row["ranks"])


def print_layers(title: str, ranks: list[list[dict]]) -> None:
    """One line per rank and layer: timeline, ring steps, memory, GPU state."""
    table = []
    for layers in ranks:
        for layer in layers:
            gpu = layer.get("gpu") or {}
            table.append({
                "rank": layer["rank"], "layer": layer["layer"], "start s": f"{layer['start_s']:.3f}",
                "end s": f"{layer['end_s']:.3f}", "attention s": f"{layer['attention_s'] or 0:.3f}",
                "steps s": " ".join(f"{kind}:{seconds:.3f}" for kind, seconds in layer["steps"]) or "-",
                "peak GiB": f"{layer.get('peak_GiB', 0):.1f}", "retries": layer.get("num_alloc_retries", 0),
                "mallocs": layer.get("num_device_alloc", 0), "frees": layer.get("num_device_free", 0),
                "SM MHz min/mean": f"{gpu.get('sm_MHz_min', '-')}/{gpu.get('sm_MHz_mean', 0):.0f}",
                "C max": gpu.get("C_max", "-"), "W": f"{gpu.get('W_mean', 0):.0f}",
                "throttle": ",".join(gpu.get("throttle", [])) or "-"})
    print_table(title, table)
