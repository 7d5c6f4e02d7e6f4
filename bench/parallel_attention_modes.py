"""Phase (d) of bench/parallel.py: prefill attention alone (one layer's causal attention, no model).

Per size: one GPU; SP as ring attention and as Ulysses (all-to-all over heads, ulysses.py) on
identical local rows: the slowest rank's time, per-GPU TFLOP/s against the one-GPU rate of the
same kernel, and the communication (the ring's exposed part; Ulysses' two all-to-alls).

Then, at the largest size, two ring calls back to back on each rank with no barrier between
(as two layers of the model run), once on the SP group's high-priority NCCL stream (what the
engine uses, groups.py) and once on a normal one: per rank and call, its start, its time and its
waits on the exchange. If the second call is the slow one on a normal stream only, the exchange
queued behind the attention kernel; if it is slow on both, look at the clocks (phase (b)).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from model_shards.parallel.groups import ParallelGroup, build_layout, new_process_group
from model_shards.parallel.lse_attention import KERNELS, attention_with_lse
from model_shards.parallel.ring import ring_attention
from model_shards.parallel.sp_plan import SequenceParallelPlan, StepSequence
from model_shards.parallel.ulysses import HeadSplit, SequenceShards, gather_heads, scatter_heads, ulysses_attention
from parallel_common import (BLOCK_SIZE, Shape, agreed, causal_flops, checked_kernel, cuda_time, release_memory,
                             slowest)
from parallel_probes import StepLog, TracedGroup, traced_kernel
from report import print_table


class NoExchange(ParallelGroup):
    """The SP group with the ring's sends and receives left out: the same kernels on the same
    shapes (equal pieces), to measure how much communication the ring leaves exposed."""

    def start_ring_exchange(self, send, recv) -> list:
        return []


def attention_modes(rank: int, device: torch.device, options, checkpoint) -> dict:
    """`checkpoint(result)` saves what is measured after every size."""
    sp = build_layout(1, options.world, device).sp
    result: dict = {"rows": [], "large_shape_checks": [], "back_to_back": []}
    lengths = [min(16384, min(options.sizes))] + options.sizes  # a warm-up (kernels, allocator, NCCL) first
    for index, length in enumerate(lengths):
        single = single_gpu_attention(rank, options.shape, length, device, result)
        rows = [single] + [mode(options.shape, sp, length, device, options, result)
                           for mode in (ring_mode, ulysses_mode)]
        if index > 0 and rank == 0:
            result["rows"] += [with_rates(row, single, options.shape) for row in rows]
        checkpoint(result)
    result["back_to_back"] = back_to_back(options.shape, sp, max(options.sizes), device, result)
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
        name = checked_kernel(shape, length, device, result["large_shape_checks"])
        q, k, v = random_qkv(shape, length, device)
        seconds = cuda_time(lambda: attention_with_lse(KERNELS[name], q, k, v, shape.head_dim ** -0.5, True))
        row = {"mode": "1 GPU", "tokens": length, "gpus": 1, "kernel": name, "time_s": seconds, "comm_s": None}
        del q, k, v
        release_memory(device)
    dist.barrier()
    return row


def ring_inputs(shape: Shape, sp: ParallelGroup, length: int, device, result: dict):
    """(plan, agreed kernel name, q, k, v) of this rank's ring rows of a `length`-token prompt."""
    plan = SequenceParallelPlan.build([StepSequence(list(range(-(-length // BLOCK_SIZE))), 0, length)], BLOCK_SIZE,
                                      sp.rank, sp.size)
    name = agreed(sp, checked_kernel(shape, plan.num_ring_rows, device, result["large_shape_checks"]))
    return (plan, name, *random_qkv(shape, plan.num_ring_rows, device))


def ring_mode(shape: Shape, sp: ParallelGroup, length: int, device, options, result: dict) -> dict:
    """Ring attention over the zigzag split; its exposed communication (time with the exchanges
    minus time without) up to --comm-max."""
    plan, name, q, k, v = ring_inputs(shape, sp, length, device, result)

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
    name = agreed(sp, checked_kernel(local_shape, length, device, result["large_shape_checks"]))
    q, k, v = random_qkv(shape, shards.rows(sp.rank), device)
    seconds = slowest(sp, lambda: ulysses_attention(q, k, v, shards, sp, shape.head_dim ** -0.5, KERNELS[name]))
    comm = slowest(sp, lambda: gather_heads(scatter_heads(q, k, v, shards, heads, sp)[0], shards, sp))
    release_memory(device)
    return {"mode": "ulysses", "tokens": length, "gpus": sp.size, "kernel": name, "time_s": seconds, "comm_s": comm}


def back_to_back(shape: Shape, sp: ParallelGroup, length: int, device, result: dict) -> list[dict]:
    """Two ring calls in a row per rank, on the high-priority SP group and on a normal-priority
    one; rank 0 gets every rank's steps."""
    normal = ParallelGroup(sp.rank, sp.size, sp.ranks, new_process_group(sp.ranks), sp.device)
    plan, name, q, k, v = ring_inputs(shape, sp, length, device, result)
    rows = []
    for stream, group in (("high_priority", sp), ("normal", normal)):
        warm_up_exchange(group)  # NCCL builds a group's point-to-point channels at first use
        log = StepLog()
        traced, kernel = TracedGroup.of(group, log), traced_kernel(KERNELS[name], log)
        dist.barrier(group=sp.process_group)
        log.start()
        for call in range(2):
            log.timed(f"call{call}", lambda: ring_attention(q, k, v, plan, traced, shape.head_dim ** -0.5, kernel))
        every = sp.all_gather_object(log.rows())
        rows.append({"tokens": length, "stream": stream, "kernel": name, "ranks": every})
        if sp.rank == 0:
            print_back_to_back(rows[-1])
    release_memory(device)
    return rows


def warm_up_exchange(group: ParallelGroup) -> None:
    send, receive = torch.ones(1024, device=group.device), torch.empty(1024, device=group.device)
    for work in group.start_ring_exchange(send, receive):
        work.wait()
    dist.barrier(group=group.process_group)


def print_back_to_back(row: dict) -> None:
    lines = []
    for rank, steps in enumerate(row["ranks"]):
        calls = [f"{kind} at {start:.2f} s: {seconds:.3f} s" for kind, start, seconds in steps if kind.startswith("call")]
        waits = [f"{seconds * 1e3:.1f}" for kind, _, seconds in steps if kind == "wait"]
        lines.append(f"  rank {rank}: {'; '.join(calls)}; waits ms [{', '.join(waits)}]")
    print(f"two ring calls back to back at {row['tokens']} tokens, {row['stream']} SP stream:\n" + "\n".join(lines),
          flush=True)


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
