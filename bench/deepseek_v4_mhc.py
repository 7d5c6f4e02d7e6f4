"""DeepSeek-V4's mHC kernels (model_shards/deepseek_v4/hyper_kernels.py) against their memory floor,
and the tilings of `stream_mixes` against each other: which one should be the default.

GPU (one H200), V4-Flash's shape (hc 4, hidden 4,096: fn is 24 x 16,384), bf16 streams of a
16K-token prefill chunk and of a 2K one:
    python3 bench/deepseek_v4_mhc.py
CPU, tiny sizes in Triton's interpreter (checks the script):
    python3 bench/deepseek_v4_mhc.py --smoke

Why: session 8's section profile of a 16K-token chunk at 128K (flash shape, 4 layers) put mHC at
45 ms, against ~4 ms if each of its 9 calls a chunk read and wrote the streams at the copy rate.
Per kernel: device ms (CUDA graph of repeats), the bytes it must move over the copy rate measured
in the same run (the floor), and the ratio. Per stream_mixes tiling: ms, and the largest
difference from a float64 product relative to the largest mix (float32 rounding is ~1e-6).
Writes $OUT/deepseek_v4_mhc.json if OUT is set, else bench/results/deepseek_v4_mhc.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/deepseek_v4_mhc.py`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shards.deepseek_v4 import hyper_kernels  # noqa: E402
from model_shards.deepseek_v4.hyper_connections import mix_streams_reference, stream_mixes_torch  # noqa: E402
from model_shards.deepseek_v4.hyper_kernels import MixesTiling  # noqa: E402
from quantized_linear import copy_rate, device_ms  # noqa: E402  (bench/quantized_linear.py)
from report import print_table, write_json  # noqa: E402

TILINGS = {
    "16 rows, ieee (session 8)": MixesTiling(),
    "32 rows, ieee": MixesTiling(rows=32),
    "64 rows, 4 splits, ieee": MixesTiling(rows=64, splits=4, warps=8),
    "64 rows, 8 splits, ieee": MixesTiling(rows=64, splits=8, warps=8),
    "16 rows, tf32x3": MixesTiling(precision="tf32x3"),
    "64 rows, 4 splits, tf32x3": MixesTiling(rows=64, splits=4, precision="tf32x3"),
    "128 rows, 8 splits, tf32x3 (default)": hyper_kernels.DEFAULT_MIXES_TILING,
}
EPS = 1e-6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 2048])
    parser.add_argument("--hc", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script")
    return parser.parse_args()


def inputs(tokens: int, hc: int, hidden: int, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    outputs = (2 + hc) * hc
    streams = torch.randn(tokens, hc, hidden, generator=generator).to(device, dtype)
    return {
        "streams": streams,
        "fn": (torch.randn(outputs, hc * hidden, generator=generator) * (hc * hidden) ** -0.5).to(device),
        "base": torch.randn(outputs, generator=generator).to(device),
        "scale": (torch.rand(3, generator=generator) + 0.5).to(device),
        "block_output": torch.randn(tokens, hidden, generator=generator).to(device, dtype),
    }


def tiling_rows(data: dict, repeats: int, device: torch.device, floor_ms: float) -> list[dict]:
    streams, fn = data["streams"], data["fn"]
    flat = streams.flatten(1).double()  # (T, hc * hidden)
    truth = flat * torch.rsqrt(flat.square().mean(dim=1, keepdim=True) + EPS) @ fn.double().T  # (T, N) float64
    rows = []
    for name, tiling in TILINGS.items():
        mixes = hyper_kernels.stream_mixes(streams, fn, EPS, tiling)
        error = ((mixes.double() - truth).abs().max() / truth.abs().max()).item()
        ms = device_ms([lambda tiling=tiling: hyper_kernels.stream_mixes(streams, fn, EPS, tiling)], repeats, device)
        rows.append({"stream_mixes tiling": name, "ms": round(ms, 3), "x floor": round(ms / floor_ms, 1),
                     "max rel. error": f"{error:.1e}"})
    torch_ms = device_ms([lambda: stream_mixes_torch(streams, fn, EPS)], repeats, device)
    rows.append({"stream_mixes tiling": "torch (F.linear, float32)", "ms": round(torch_ms, 3),
                 "x floor": round(torch_ms / floor_ms, 1), "max rel. error": "-"})
    return rows


def kernel_rows(data: dict, repeats: int, device: torch.device, bytes_per_s: float) -> list[dict]:
    """Each mHC kernel of one block (default tiling) and the torch forms, against its bytes' floor."""
    streams, fn, out = data["streams"], data["fn"], data["block_output"]
    tokens, hc, _ = streams.shape
    stream_bytes, out_bytes = streams.nbytes, out.nbytes
    mixes = hyper_kernels.stream_mixes(streams, fn, EPS)
    pre, post, comb = hyper_kernels.hyper_weights(mixes, data["base"], data["scale"], hc, 20, EPS)
    cases = [
        ("stream_mixes", lambda: hyper_kernels.stream_mixes(streams, fn, EPS), stream_bytes),
        ("hyper_weights", lambda: hyper_kernels.hyper_weights(mixes, data["base"], data["scale"], hc, 20, EPS),
         mixes.nbytes + pre.nbytes + post.nbytes + comb.nbytes),
        ("collapse", lambda: hyper_kernels.collapse(pre, streams), stream_bytes + out_bytes),
        ("mix", lambda: hyper_kernels.mix(streams, out, post, comb), 2 * stream_bytes + out_bytes),
        ("mix (torch)", lambda: mix_streams_reference(streams, out, post, comb), 2 * stream_bytes + out_bytes),
    ]
    rows = []
    for name, call, moved in cases:
        ms = device_ms([call], repeats, device)
        floor = moved / bytes_per_s * 1e3
        rows.append({"kernel": name, "tokens": tokens, "ms": round(ms, 3), "floor ms": round(floor, 3),
                     "x floor": round(ms / floor, 1)})
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.tokens, args.hc, args.hidden, args.repeats = [70], 4, 96, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bytes_per_s = copy_rate(device) if device.type == "cuda" else 1e10
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
               "copy_rate_gb_s": round(bytes_per_s / 1e9, 1), "hc": args.hc, "hidden": args.hidden, "lengths": {}}
    for tokens in args.tokens:
        data = inputs(tokens, args.hc, args.hidden, device, dtype)
        floor_ms = data["streams"].nbytes / bytes_per_s * 1e3
        tilings = tiling_rows(data, args.repeats, device, floor_ms)
        kernels = kernel_rows(data, args.repeats, device, bytes_per_s)
        print_table(f"stream_mixes at {tokens} tokens (floor {floor_ms:.3f} ms: the streams read once)", tilings)
        print_table(f"mHC kernels at {tokens} tokens, copy rate {bytes_per_s / 1e9:.0f} GB/s", kernels)
        results["lengths"][tokens] = {"tilings": tilings, "kernels": kernels}
    write_json("deepseek_v4_mhc", results)


if __name__ == "__main__":
    main()
