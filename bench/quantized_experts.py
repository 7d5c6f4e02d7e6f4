"""Routed experts kept in FP4 (model_shards/deepseek_v4/quantized_experts.py): one grouped kernel
launch against torch._grouped_mm (grouped_experts.grouped_linear) on the dequantized bf16 experts.

GPU (one H200), V4-Flash's 256 experts of hidden 4096 x 2048, top-6 routing:
    python3 bench/quantized_experts.py
CPU, tiny shapes in Triton's interpreter (checks the script; on a CUDA machine prefix TRITON_INTERPRET=1):
    python3 bench/quantized_experts.py --smoke

Per matrix (gate_up: (E, 2I, hidden), down: (E, hidden, I)) and per token count T (R = 6T rows):
device ms over a few random routings (CUDA graph), TFLOP/s, the bytes of the experts the routing
touched per second, and ours against the reference: max difference in bf16 ulps, share identical.
Writes $OUT/quantized_experts.json if OUT is set, else bench/results/quantized_experts.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/quantized_experts.py`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shards.deepseek_v4.grouped_experts import ExpertRows, grouped_linear, sort_by_expert  # noqa: E402
from model_shards.deepseek_v4.interpreter_numerics import gpu_bf16_numerics  # noqa: E402
from model_shards.deepseek_v4.presets import preset_config  # noqa: E402
from model_shards.deepseek_v4.quantized_experts import QuantizedExperts, grouped_quantized_matmul  # noqa: E402
from model_shards.deepseek_v4.quantized_linear import Fp4RowWeight  # noqa: E402
from model_folder.deepseek_v4_config import parse_deepseek_v4_config  # noqa: E402
from quantized_linear import bf16_ulps, device_ms  # noqa: E402  (bench/quantized_linear.py)

ROUTINGS = 4  # distinct routings cycled per timing: decode's few experts must not stay in L2


def random_experts(experts: int, rows: int, cols: int, device: torch.device, seed: int) -> QuantizedExperts:
    """Random e2m1 codes (rms 2.93) with ue8m0 scales near 1 / (2.93 sqrt(cols)): outputs of order one."""
    generator = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 256, (experts, rows, cols // 2), generator=generator, device=device, dtype=torch.uint8)
    exponent = 127 - round(math.log2(2.93 * math.sqrt(cols)))
    scale = torch.randint(exponent - 1, exponent + 2, (experts, rows, -(-cols // 32)), generator=generator,
                          device=device, dtype=torch.uint8)
    return QuantizedExperts(codes.view(torch.int8), scale, Fp4RowWeight)


def random_routing(tokens: int, experts: int, top_k: int, device: torch.device, seed: int) -> ExpertRows:
    generator = torch.Generator(device=device).manual_seed(seed)
    chosen = torch.rand(tokens, experts, generator=generator, device=device).topk(top_k, dim=-1).indices
    return sort_by_expert(chosen, experts)


def measure(name: str, experts: QuantizedExperts, tokens: int, top_k: int, device: torch.device,
            repeats: int) -> dict[str, object]:
    first = experts.expert(0)
    x = torch.randn(tokens, first.in_features, device=device).to(torch.bfloat16)
    routings = [random_routing(tokens, experts.num_experts, top_k, device, seed) for seed in range(ROUTINGS)]
    inputs = [(x[routing.tokens], routing.offsets) for routing in routings]  # (R, K) sorted rows, group ends
    dequantized = experts.dequantize()  # (E, N, K) bf16: the reference's weights
    rows, ends = inputs[0]
    ours, reference = grouped_quantized_matmul(rows, experts, ends), grouped_linear(rows, dequantized, ends)
    held = int(ends[-1])  # rows past the last group are undefined in both
    ours, reference = ours[:held], reference[:held]
    ours_ms = device_ms([lambda rows=rows, ends=ends: grouped_quantized_matmul(rows, experts, ends)
                         for rows, ends in inputs], repeats, device)
    bf16_ms = device_ms([lambda rows=rows, ends=ends: grouped_linear(rows, dequantized, ends)
                         for rows, ends in inputs], repeats, device)
    touched = sum(int((torch.diff(ends, prepend=ends.new_zeros(1)) > 0).sum()) for _, ends in inputs) / ROUTINGS
    flops = 2 * tokens * top_k * first.out_features * first.in_features
    return {"matrix": name, "experts": experts.num_experts, "N": first.out_features, "K": first.in_features,
            "tokens": tokens, "experts_touched": touched, "ms": ours_ms, "bf16_ms": bf16_ms,
            "tflops": flops / ours_ms * 1e-9, "bf16_tflops": flops / bf16_ms * 1e-9,
            "weight_gbps": touched * first.nbytes / ours_ms * 1e-6,
            "bf16_weight_gbps": touched * 2 * first.out_features * first.in_features / bf16_ms * 1e-6,
            "max_ulps_vs_reference": bf16_ulps(ours, reference).max().item(),
            "identical_share": (ours == reference).double().mean().item()}


def print_row(row: dict[str, object]) -> None:
    print(f"fp4 experts {row['matrix']:7s} E={row['experts']} N={row['N']} K={row['K']} T={row['tokens']:6d} "
          f"({row['experts_touched']:.0f} touched) | ours {row['ms']:8.4f} ms {row['tflops']:7.1f} TFLOP/s "
          f"{row['weight_gbps']:7.0f} GB/s | bf16 grouped_mm {row['bf16_ms']:8.4f} ms {row['bf16_tflops']:7.1f} "
          f"TFLOP/s {row['bf16_weight_gbps']:7.0f} GB/s | vs bf16: {row['max_ulps_vs_reference']:.1f} ulp, "
          f"{100 * row['identical_share']:.1f}% identical", flush=True)


def run(experts: int, hidden: int, inner: int, token_counts: list[int], top_k: int, device: torch.device,
        repeats: int) -> list[dict[str, object]]:
    rows = []
    for seed, (name, out_features, in_features) in enumerate([("gate_up", 2 * inner, hidden), ("down", hidden, inner)]):
        stack = random_experts(experts, out_features, in_features, device, seed)
        for tokens in token_counts:
            rows.append(measure(name, stack, tokens, top_k, device, repeats))
            print_row(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 4096], help="token counts T")
    args = parser.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 on a CUDA machine")
    if args.smoke:
        with gpu_bf16_numerics():
            run(5, 64, 32, [1, 9], 2, torch.device("cpu"), repeats=1)
        return
    arch = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))
    rows = run(arch.n_routed_experts, arch.hidden_size, arch.moe_intermediate_size, args.tokens,
               arch.num_experts_per_tok, torch.device("cuda"), repeats=10)
    out = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results")) / "quantized_experts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
