"""Phase (e) of bench/parallel.py: TP over all GPUs against SP over all GPUs against one GPU, for
prefill and decode, at --layout-sizes (8K, 128K, 512K), the table behind the rule in
docs/parallelism.md for choosing a layout by prompt length.

One GPU and SP come from phase (b) (the same model, prompt and decode steps); TP runs here: each
rank holds 1/tp of the heads, the MLP and the vocabulary, the whole prompt's rows, and two
all-reduces per layer. Both parallel layouts use the same attention kernels as one GPU (the SP
backend on a one-rank group for TP, which then attends over its own heads only).
"""

from __future__ import annotations

import torch.distributed as dist

from model_shards.parallel.groups import ParallelGroup, build_layout
from parallel_common import release_memory, set_backend
from parallel_probes import TracedBackend
from parallel_scaling import Bench, measure_decode, measure_prefill, print_prefill
from report import print_table


def layouts(bench: Bench, scaling_result: dict, checkpoint) -> dict:
    """TP=world prefill + decode at every layout size; the comparison table on rank 0."""
    device, options = bench.device, bench.options
    tp = build_layout(options.world, 1, device).tp
    single = ParallelGroup(0, 1, (bench.rank,), None, device)
    model, probe, traced = bench.traced_model(options.layers, single, tp)
    backend = TracedBackend(traced)
    set_backend(model, backend)
    result: dict = {"tp_prefill": [], "tp_decode": []}
    sizes = options.layout_sizes
    for index, length in enumerate([sizes[0]] + sizes):  # a warm-up first
        dist.barrier()
        row, state = measure_prefill(model, probe, traced, tp, length, device)
        decode = measure_decode(model, probe, traced, tp, state, length, device)
        del state
        release_memory(device)
        row["kernel"], decode["kernel"] = backend.kernel_name, backend.decode_kernel_name
        if index and bench.rank == 0:
            result["tp_prefill"].append(row)
            result["tp_decode"].append(decode)
            print_prefill(row, options.long_run)
        checkpoint(result)
    del model
    release_memory(device)
    if bench.rank == 0:
        result["table"] = layout_table(scaling_result, result, sizes)
        print_layout_table(result["table"], options.world)
    return result


def layout_table(scaling_result: dict, result: dict, sizes: list[int]) -> list[dict]:
    """Per size and layout: prefill and decode-step times, and speedups over one GPU."""
    prefill = {(r["tokens"], r["sp"], r["tp"]): r for r in scaling_result.get("prefill", []) + result["tp_prefill"]}
    decode = {(r["context"], r["sp"], r["tp"]): r for r in scaling_result.get("decode", []) + result["tp_decode"]}
    rows = []
    for tokens in sizes:
        one_prefill, one_decode = prefill.get((tokens, 1, 1)), decode.get((tokens, 1, 1))
        for key in sorted(k for k in prefill if k[0] == tokens):
            p, d = prefill[key], decode.get(key)
            rows.append({"tokens": tokens, "sp": key[1], "tp": key[2], "prefill_s": p["total_s"],
                         "prefill_speedup": one_prefill["total_s"] / p["total_s"] if one_prefill else None,
                         "decode_step_ms": d["step_s"] * 1e3 if d else None,
                         "decode_forward_ms": d["forward_s"] * 1e3 if d else None,
                         "decode_speedup": one_decode["step_s"] / d["step_s"] if d and one_decode else None})
    return rows


def print_layout_table(rows: list[dict], world: int) -> None:
    def times(value, unit=""):
        return "-" if value is None else f"{value:.3g}{unit}"
    table = [{"tokens": r["tokens"], "layout": "1 GPU" if r["sp"] * r["tp"] == 1 else
              f"SP={r['sp']}" if r["sp"] > 1 else f"TP={r['tp']}",
              "prefill s": times(r["prefill_s"]), "prefill speedup": times(r["prefill_speedup"], "x"),
              "decode step ms": times(r["decode_step_ms"]), "decode forward ms": times(r["decode_forward_ms"]),
              "decode speedup": times(r["decode_speedup"], "x")} for r in rows]
    print_table(f"(e) layouts on {world} GPUs against one: prefill and one decode step (whole step, host included)",
                table)
