"""DeepSeek-V4's attention core for a prefill chunk of an HCA or CSA layer: the layers' path
(`sink_attention`: logits written per block of queries, the softmax kernel in place, then the
probabilities times the keys) against the flash-style kernel (`chunk_attention_kernel.py`: one
online softmax, no logits in memory), in each of its tilings.

GPU, V4-Flash's shape (64 heads, head_dim 512, window 128, HCA rate 128; CSA rate 4, top-512),
a 16,384-token chunk ending at each --context (the last chunk of a prompt that long; 1M: 8,192
closed HCA entries, 262,000 CSA entries of which each query reads its 512):
    python3 bench/deepseek_v4_chunk_attention.py
CPU, tiny sizes in Triton's interpreter (checks the script):
    python3 bench/deepseek_v4_chunk_attention.py --smoke

Why: at 1M the attention core is the largest and fastest-growing part of a chunk (session 10,
H100: 576 ms of the last chunk's 949). Per case: device ms, TFLOP/s (q.k and p.k over the keys
each query sees: window + closed HCA entries or its CSA top-k) against the bf16 matmul rate measured in the same run,
and the largest difference from the layers' path relative to its largest output.
Writes $OUT/deepseek_v4_chunk_attention.json if OUT is set, else bench/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/...`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shards.deepseek_v4.chunk_attention_kernel import TILINGS, chunk_attention  # noqa: E402
from model_shards.deepseek_v4.entries import ContiguousEntries  # noqa: E402
from model_shards.deepseek_v4.sink_attention import CompressedKeys, sink_attention  # noqa: E402
from quantized_linear import device_ms  # noqa: E402  (bench/quantized_linear.py)
from report import print_table, write_json  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[131072, 524288, 1048000])
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=512)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--rate", type=int, default=128, help="HCA's compress rate")
    parser.add_argument("--csa-rate", type=int, default=4)
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--layers", nargs="+", default=["HCA", "CSA"], choices=["HCA", "CSA"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script")
    return parser.parse_args()


def inputs(args: argparse.Namespace, layer: str, context: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(q, window_keys, window, compressed keys, sinks, scale) of the chunk ending at `context`."""
    generator = torch.Generator(device=device).manual_seed(context)
    first, rate = context - args.chunk, args.rate if layer == "HCA" else args.csa_rate
    random = lambda *shape: torch.randn(*shape, generator=generator, device=device).to(dtype)  # noqa: E731
    q = random(args.chunk, args.heads, args.head_dim)
    window_keys = random(args.window - 1 + args.chunk, args.head_dim)
    compressed = CompressedKeys(ContiguousEntries(random(context // rate, args.head_dim)), None, first, rate)
    if layer == "CSA":  # top-k of the entries closed at each query's position (all of them are > k here)
        closed = (first + torch.arange(args.chunk, device=device) + 1) // rate
        picks = torch.rand(args.chunk, args.topk, generator=generator, device=device) * closed[:, None]
        compressed = CompressedKeys(compressed.entries, selected=picks.long())
    sinks = torch.randn(args.heads, generator=generator, device=device)
    return q, window_keys, args.window, compressed, sinks, args.head_dim ** -0.5


def flops(args: argparse.Namespace, layer: str, context: int) -> float:
    """q.k and p.k (2 FLOPs a multiply-add each) over each query's window and entries."""
    first = context - args.chunk
    entries = sum((first + i + 1) // args.rate for i in range(args.chunk)) if layer == "HCA" else \
        args.chunk * args.topk
    return 4.0 * args.heads * args.head_dim * (args.chunk * args.window + entries)


def matmul_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / device_ms([lambda: a @ b], 5, device) / 1e9


def case_rows(args: argparse.Namespace, layer: str, context: int, device: torch.device, dtype: torch.dtype,
              ceiling: float) -> list[dict]:
    arguments = inputs(args, layer, context, device, dtype)
    reference = sink_attention(*arguments)
    scale = reference.float().abs().max().item()
    cases = {"sink_attention (the layers' path)": lambda: sink_attention(*arguments)}
    cases |= {f"fused: {name}": (lambda tiling=tiling: chunk_attention(*arguments, tiling=tiling))
              for name, tiling in TILINGS.items()}
    rows, work = [], flops(args, layer, context)
    for name, call in cases.items():
        try:
            error = (call().float() - reference.float()).abs().max().item() / scale
            ms = device_ms([call], args.repeats, device)
        except Exception as failure:  # noqa: BLE001 - a tiling that cannot launch is a row, not the end
            rows.append({"case": name, "layer": layer, "context": context, "error": str(failure).splitlines()[0][:80]})
            continue
        tflops = work / ms / 1e9
        rows.append({"case": name, "layer": layer, "context": context, "ms": round(ms, 2), "TFLOP/s": round(tflops, 1),
                     "x matmul": round(tflops / ceiling, 2) if ceiling else "-", "max rel. diff": f"{error:.1e}"})
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.context, args.chunk, args.heads, args.head_dim, args.window, args.rate, args.repeats = \
            [96, 200], 64, 2, 16, 16, 8, 1
        args.topk = 8
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceiling = matmul_tflops(device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
               "matmul_tflops": round(ceiling, 1), "args": vars(args), "contexts": {}}
    for layer in args.layers:
        for context in args.context:
            rows = case_rows(args, layer, context, device, dtype, ceiling)
            print_table(f"{layer} attention core, a {args.chunk}-token chunk ending at {context} "
                        f"(bf16 matmul {ceiling:.0f} TFLOP/s)", rows)
            results["contexts"][f"{layer} {context}"] = rows
    write_json("deepseek_v4_chunk_attention", results)


if __name__ == "__main__":
    main()
