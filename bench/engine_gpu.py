"""The whole engine on one GPU: TTFT and TPOT of an 8B-shaped model (a few layers) per block size.

Run on a CUDA machine: `python bench/engine_gpu.py [--layers 2] [--prompt-tokens 8192 32768]`.
Per-layer figures scale to the full 32-layer model (layers are identical in cost). The prefill
rate is set against the dense bf16 matmul ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from cluster.config import (
    CacheSettings,
    LongctxConfig,
    ModelSettings,
    SchedulerSettings,
)
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_shards.make_model import make_model
from protocol.sampling_params import SamplingParams


def matmul_ceiling_tflops(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * size**3 / (time.perf_counter() - start) / 1e12


def prefill_flops_per_layer(num_tokens: int, hidden=4096, ffn=14336, kv_dim=1024) -> float:
    """Matmul FLOPs of one Llama-3-8B layer over n tokens, plus causal attention (n^2/2)."""
    linear = 2 * num_tokens * (hidden * (hidden + 2 * kv_dim) + hidden * hidden + 3 * hidden * ffn)
    attention = 2 * 2 * num_tokens * num_tokens / 2 * hidden
    return linear + attention


def run_case(model_dir: str, block_size: int, prompt_tokens: int, layers: int) -> dict:
    config = LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="bfloat16", device="cuda"),
        cache=CacheSettings(block_size=block_size),
        scheduler=SchedulerSettings(max_tokens_per_step=8192),
    )
    engine = LLMEngine(config)
    prompt = [random.Random(block_size).randrange(10, 120_000) for _ in range(prompt_tokens)]
    generate(engine, [prompt[:64]], SamplingParams(max_tokens=4))  # warm-up: kernels, allocator
    result = generate(engine, [prompt], SamplingParams(max_tokens=32, ignore_eos=True))[0][0]
    flops = prefill_flops_per_layer(prompt_tokens) * layers
    row = {
        "block_size": block_size, "prompt_tokens": prompt_tokens, "layers": layers,
        "ttft_s": round(result.ttft_s, 3), "tpot_ms": round(result.tpot_s * 1e3, 2),
        "prefill_TFLOPs": round(flops / result.ttft_s / 1e12, 1),
        "ttft_s_per_layer": round(result.ttft_s / layers, 4),
    }
    engine.shutdown()
    del engine
    torch.cuda.empty_cache()
    return row


def profile_steps(model_dir: str, block_size: int, prompt_tokens: int) -> None:
    """Print the top GPU and CPU ops of a prefill and a few decode steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    config = LongctxConfig(
        model=ModelSettings(path=model_dir, dtype="bfloat16", device="cuda"),
        cache=CacheSettings(block_size=block_size),
        scheduler=SchedulerSettings(max_tokens_per_step=8192),
    )
    engine = LLMEngine(config)
    prompt = [random.Random(0).randrange(10, 120_000) for _ in range(prompt_tokens)]
    generate(engine, [prompt[:64]], SamplingParams(max_tokens=4))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        generate(engine, [prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    print(f"profile: block_size={block_size}, prompt={prompt_tokens}, blocks={engine.executor.num_kv_blocks}")
    print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--profile-block-size", type=int, default=None, help="profile instead of timing")
    args = parser.parse_args()
    if args.profile_block_size:
        with tempfile.TemporaryDirectory() as folder:
            model_dir = str(make_model(folder, "llama3-8b-shape", num_hidden_layers=args.layers))
            profile_steps(model_dir, args.profile_block_size, args.prompt_tokens[0])
        return
    ceiling = matmul_ceiling_tflops()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(make_model(folder, "llama3-8b-shape", num_hidden_layers=args.layers))
        rows = [run_case(model_dir, bs, n, args.layers) for n in args.prompt_tokens for bs in args.block_sizes]
    for row in rows:
        row["of_matmul_ceiling"] = round(row["prefill_TFLOPs"] / ceiling, 3)
    print(f"bf16 matmul ceiling measured: {ceiling:.0f} TFLOP/s")
    print("  ".join(f"{c:>16}" for c in rows[0]))
    for row in rows:
        print("  ".join(f"{row[c]!s:>16}" for c in row))
    out_dir = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "matmul_ceiling_TFLOPs": ceiling, "rows": rows}
    (out_dir / "engine_gpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
