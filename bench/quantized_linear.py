"""Weight-only FP8 / FP4 matmuls (model_shards/deepseek_v4/quantized_linear.py) on DeepSeek-V4-Flash
shapes, against bf16 F.linear on the dequantized weight measured in the same run.

GPU (one H200):
    python3 bench/quantized_linear.py
CPU, tiny shapes in Triton's interpreter (checks the script, the numbers mean nothing; on a
machine with CUDA prefix TRITON_INTERPRET=1):
    python3 bench/quantized_linear.py --smoke

Per weight (the distinct linear shapes of a V4-Flash layer: attention and compressor projections
and the shared expert in FP8 with ue8m0 128x128 block scales, routed experts in FP4) and per M:
- checks: the kernel's dequantized tiles equal dequantize() bit for bit; max |ours - reference|
  and its ratio to the float32 summation-order bound (tests/model_shards/test_deepseek_v4_quantized_linear.py);
- device ms (a CUDA graph of repeated calls over enough weight copies to miss L2), TFLOP/s, and
  weight bytes read per second, for ours (default tiling, and the best of a small sweep) and for
  bf16 F.linear (cuBLAS) on the dequantized weight; the device copy rate as the bandwidth ceiling.
Writes $OUT/quantized_linear.json if OUT is set, else bench/results/quantized_linear.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/quantized_linear.py`

from model_shards.deepseek_v4.block_format import quantize_fp4, quantize_fp8  # noqa: E402
from model_shards.deepseek_v4.interpreter_numerics import gpu_bf16_numerics  # noqa: E402
from model_shards.deepseek_v4.presets import preset_config  # noqa: E402
from model_shards.deepseek_v4.quantized_linear import (DECODE_ROWS, FP8_BLOCK, Fp4RowWeight,  # noqa: E402
                                                       Fp8BlockWeight, QuantizedWeight, Tiling, default_tiling,
                                                       dequantize_triton, quantized_matmul)

from model_folder.deepseek_v4_config import parse_deepseek_v4_config  # noqa: E402

L2_MISS_BYTES = 512 << 20  # weight copies cycled per timing: far over the H200's 50 MB L2
CHECK_ROWS = 4096  # rows compared in float64 (the same kernel as more rows; bounds memory)
PREFILL_SWEEP = [Tiling(128, 128, 128, 8, 3), Tiling(128, 256, 64, 8, 3), Tiling(64, 128, 128, 4, 4),
                 Tiling(128, 64, 128, 4, 4)]


def flash_shapes() -> list[tuple[str, int, int, str]]:
    """(name, out N, in K, format) of V4-Flash's distinct linear shapes."""
    arch = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))
    hidden, heads, dim = arch.hidden_size, arch.num_attention_heads, arch.head_dim
    inner = arch.moe_intermediate_size
    return [("wq_a / wo_a group / CSA compressor", arch.q_lora_rank, hidden, "fp8"),
            ("wq_b", heads * dim, arch.q_lora_rank, "fp8"), ("wkv", dim, hidden, "fp8"),
            ("wo_b", hidden, arch.o_groups * arch.o_lora_rank, "fp8"),
            ("indexer wq_b", arch.index_n_heads * arch.index_head_dim, arch.q_lora_rank, "fp8"),
            ("shared expert w1/w3", inner, hidden, "fp8"), ("shared expert w2", hidden, inner, "fp8"),
            ("routed expert w1/w3", inner, hidden, "fp4"), ("routed expert w2", hidden, inner, "fp4")]


def make_weight(rows: int, cols: int, fmt: str, device: torch.device, seed: int) -> QuantizedWeight:
    generator = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator, device=device) * cols ** -0.5
    if fmt == "fp8":  # DeepSeek's recipe, as `longctx make-model --quantize` writes it
        return Fp8BlockWeight(*quantize_fp8(w, (FP8_BLOCK, FP8_BLOCK), ue8m0=True))
    return Fp4RowWeight(*quantize_fp4(w))


def device_ms(calls: list[Callable[[], object]], repeats: int, device: torch.device) -> float:
    """Mean device ms of one call: `repeats` rounds over `calls` in a CUDA graph (no launch gaps)."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            for call in calls:
                call()
        return (time.perf_counter() - start) * 1e3 / (repeats * len(calls))
    for call in calls:
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (repeats * len(calls))


def copy_rate(device: torch.device) -> float:
    """Bytes moved (read + written) per second by a 1 GiB device-to-device copy."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / (device_ms([lambda: target.copy_(source)], 10, device) * 1e-3)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the bf16 spacing at the larger of |a|, |b| (2 ** (exponent - 8))."""
    _, exponent = torch.frexp(torch.maximum(a.abs(), b.abs()).float().clamp_min(2.0 ** -120))
    return (a.double() - b.double()).abs() / torch.exp2(exponent.double() - 8)


def check(weight: QuantizedWeight, x: torch.Tensor, tiling: Tiling) -> dict[str, object]:
    """Bit-exact tiles; ours against the reference: max difference (absolute, in bf16 ulps), share
    of identical outputs, and the largest error over the summation-order bound (must be <= 1)."""
    w = weight.dequantize()
    ours, reference = quantized_matmul(x, weight, tiling), F.linear(x, w)
    exact = x.double() @ w.double().T
    bound = 2.0 ** -8 * exact.abs() + x.shape[1] * 2.0 ** -22 * (x.double().abs() @ w.double().abs().T)
    return {"tile_bit_exact": torch.equal(dequantize_triton(weight).view(torch.int16), w.view(torch.int16)),
            "max_diff_vs_reference": (ours.double() - reference.double()).abs().max().item(),
            "max_ulps_vs_reference": bf16_ulps(ours, reference).max().item(),
            "identical_share": (ours == reference).double().mean().item(),
            "max_error_over_bound": ((ours.double() - exact).abs() / bound).max().item()}


def tilings_to_try(rows: int, weight: QuantizedWeight, processors: int) -> list[Tiling]:
    """The default first, then a few neighbours: tile width, split-K, which operand the tile is."""
    base = default_tiling(rows, weight, processors)
    if rows > DECODE_ROWS:
        variants = [replace(base, weight_left=True), *PREFILL_SWEEP]
    else:
        splits = dict.fromkeys((max(1, base.split_k // 2), base.split_k, 2 * base.split_k))
        variants = [replace(base, block_n=n, split_k=split, weight_left=left) for n in (64, 128)
                    for split in splits for left in (False, True)]
    return [base, *(v for v in dict.fromkeys(variants) if v != base)]


def measure(name: str, weight: QuantizedWeight, fmt: str, rows: int, device: torch.device,
            sweep: bool, repeats: int) -> dict[str, object]:
    rows_in, cols_out = weight.in_features, weight.out_features
    x = torch.randn(rows, rows_in, device=device).to(torch.bfloat16)
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    decode = device.type == "cuda" and rows <= DECODE_ROWS  # memory-bound: the weight must come from HBM
    copies = min(256, -(-L2_MISS_BYTES // weight.nbytes)) if decode else 1
    ours = [weight, *(type(weight)(weight.weight.clone(), weight.scale.clone()) for _ in range(copies - 1))]
    dequantized = [w.dequantize() for w in ours]
    candidates = tilings_to_try(rows, weight, processors) if sweep else [default_tiling(rows, weight, processors)]
    timings = [(device_ms([lambda w=w, t=t: quantized_matmul(x, w, t) for w in ours], repeats, device), t)
               for t in candidates]
    reference_ms = device_ms([lambda w=w: F.linear(x, w) for w in dequantized], repeats, device)
    best_ms, best = min(timings, key=lambda pair: pair[0])
    flops = 2 * rows * rows_in * cols_out
    return {"weight": name, "format": fmt, "N": cols_out, "K": rows_in, "M": rows,
            **check(weight, x[:CHECK_ROWS], candidates[0]), "ms": timings[0][0], "best_ms": best_ms, "best_tiling": best.__dict__,
            "bf16_ms": reference_ms, "tflops": flops / timings[0][0] * 1e-9, "best_tflops": flops / best_ms * 1e-9,
            "bf16_tflops": flops / reference_ms * 1e-9, "weight_gbps": weight.nbytes / best_ms * 1e-6,
            "bf16_weight_gbps": 2 * rows_in * cols_out / reference_ms * 1e-6}


def _label(tiling: dict[str, int]) -> str:
    left = "/W-left" if tiling["weight_left"] else ""
    return "{block_m}x{block_n}x{block_k}/w{warps}/s{stages}/k{split_k}".format(**tiling) + left


def print_row(row: dict[str, object]) -> None:
    print(f"{row['format']} {row['weight'][:34]:34s} N={row['N']:6d} K={row['K']:5d} M={row['M']:6d} | "
          f"ours {row['ms']:8.4f} ms (best {row['best_ms']:8.4f} {_label(row['best_tiling'])}) {row['best_tflops']:7.1f} TFLOP/s "
          f"{row['weight_gbps']:7.0f} GB/s | bf16 {row['bf16_ms']:8.4f} ms {row['bf16_tflops']:7.1f} TFLOP/s "
          f"{row['bf16_weight_gbps']:7.0f} GB/s | vs bf16: max diff {row['max_diff_vs_reference']:.3g} "
          f"= {row['max_ulps_vs_reference']:.1f} ulp, {100 * row['identical_share']:.1f}% identical, "
          f"error/bound {row['max_error_over_bound']:.2f}, exact tiles {row['tile_bit_exact']}", flush=True)


def run(shapes: list[tuple[str, int, int, str]], rows_list: list[int], device: torch.device, sweep: bool,
        repeats: int) -> dict[str, object]:
    rows_out = []
    for index, (name, out_features, in_features, fmt) in enumerate(shapes):
        weight = make_weight(out_features, in_features, fmt, device, seed=index)
        for rows in rows_list:
            row = measure(name, weight, fmt, rows, device, sweep, repeats)
            print_row(row)
            rows_out.append(row)
    exact = all(row["tile_bit_exact"] for row in rows_out)
    print(f"dequantized tile bit-exact: {exact}; largest error / bound: "
          f"{max(row['max_error_over_bound'] for row in rows_out):.3f}")
    return {"rows": rows_out, "tile_bit_exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 4096, 16384], help="M values")
    parser.add_argument("--no-sweep", action="store_true", help="time the default tiling only")
    args = parser.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 on a CUDA machine")
    if args.smoke:
        shapes = [("tiny fp8", 96, 160, "fp8"), ("tiny fp4", 64, 96, "fp4")]
        with gpu_bf16_numerics():
            run(shapes, [1, 7], torch.device("cpu"), sweep=True, repeats=1)
        return
    device = torch.device("cuda")
    rate = copy_rate(device)
    print(f"{torch.cuda.get_device_name(device)}: device copy moves {rate / 1e9:.0f} GB/s (read + write)")
    results = {"device": torch.cuda.get_device_name(device), "copy_gbps": rate / 1e9,
               **run(flash_shapes(), args.rows, device, not args.no_sweep, repeats=20)}
    out = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results")) / "quantized_linear.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
