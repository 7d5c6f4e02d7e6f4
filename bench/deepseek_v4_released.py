"""A DeepSeek-V4 folder in DeepSeek's released layout (FP8 blocks, FP4 experts) loaded onto a device:
load time, device bytes against the bf16 parameter bytes, the host's peak RSS, and the loaded
weights bit-equal to the same folder loaded on the CPU (dequantizing on CUDA, ue8m0 and FP4 there).

`--quantized-weights both` compares model.quantized_weights dequantize and keep end to end: per
mode, the weight bytes, peak device bytes, a `--tokens` prefill and `--decode-steps` greedy decode
steps (ms, after a warm-up that compiles the kernels), and keep's logits against dequantize's
(largest difference, greedy tokens equal). On a CPU the two are bit-equal; on CUDA keep runs the
Triton kernels (docs/quantized_weights.md: within float32 summation order of the reference).

GPU (one H200), the flash shape's first --layers layers with --experts experts (a few minutes,
mostly writing the folder):
    python3 bench/deepseek_v4_released.py [--quantized-weights both --layers 4 --experts 32]
CPU, the tiny preset:
    python3 bench/deepseek_v4_released.py --preset deepseek-v4-tiny --device cpu [--quantized-weights both]
Writes $OUT/deepseek_v4_released.json if OUT is set, else prints only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/deepseek_v4_released.py`

from model_folder.deepseek_v4_quantization import BlockQuantization  # noqa: E402
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM  # noqa: E402
from model_shards.deepseek_v4.presets import make_deepseek_v4_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v4-flash-shape")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8, help="n_routed_experts (the flash shape has 256)")
    parser.add_argument("--expert-dtype", default="fp4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quantized-weights", choices=["dequantize", "keep", "both"], default="dequantize")
    parser.add_argument("--tokens", type=int, default=1024, help="--quantized-weights both: prefill tokens")
    parser.add_argument("--decode-steps", type=int, default=32, help="--quantized-weights both: greedy steps")
    return parser.parse_args()


def make_folder(args: argparse.Namespace, out: Path) -> Path:
    overrides = {"n_routed_experts": args.experts} if args.preset != "deepseek-v4-tiny" else {}
    layers = args.layers if args.preset != "deepseek-v4-tiny" else None
    quantization = BlockQuantization(scale_format="ue8m0", expert_format=args.expert_dtype)
    return make_deepseek_v4_model(out, args.preset, layers=layers, quantization=quantization, **overrides)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(folder: Path, device: str, keep_quantized: bool = False) -> tuple[DeepseekV4ForCausalLM, float]:
    synchronize(device)
    start = time.perf_counter()
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.bfloat16, device=device,
                                              keep_quantized=keep_quantized)
    synchronize(device)
    return model, time.perf_counter() - start


def greedy_run(model: DeepseekV4ForCausalLM, ids: torch.Tensor, steps: int, device: str) -> dict:
    """Prefill ids, then `steps` greedy tokens: seconds of each phase and the logits of every step."""
    state, logits = model.new_state(), []
    synchronize(device)
    start = time.perf_counter()
    logits.append(model.compute_logits(model(ids, state)[-1:]))
    synchronize(device)
    prefilled = time.perf_counter()
    for _ in range(steps):
        logits.append(model.compute_logits(model(logits[-1].argmax(-1), state)))
    synchronize(device)
    return {"prefill_s": prefilled - start, "decode_s": time.perf_counter() - prefilled, "logits": torch.cat(logits)}


def compare_modes(folder: Path, args: argparse.Namespace) -> dict:
    """dequantize against keep: bytes, prefill and decode time, keep's logits against dequantize's."""
    ids = torch.randint(0, 1000, (args.tokens,), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows, runs, cuda = {}, {}, args.device.startswith("cuda")
    for mode in ("dequantize", "keep"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, seconds = load(folder, args.device, keep_quantized=mode == "keep")
        greedy_run(model, ids, 2, args.device)  # warm-up: every tiling compiles here, not in the timing
        runs[mode] = greedy_run(model, ids, args.decode_steps, args.device)
        rows[mode] = {"load_s": round(seconds, 3), "weight_bytes": model.weight_nbytes(),
                      "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                      "prefill_ms": round(runs[mode]["prefill_s"] * 1e3, 2),
                      "decode_ms_per_step": round(runs[mode]["decode_s"] * 1e3 / max(1, args.decode_steps), 3)}
        del model
    kept, dequantized = runs["keep"]["logits"], runs["dequantize"]["logits"]
    rows["keep_vs_dequantize"] = {"max_abs_logit_difference": (kept - dequantized).abs().max().item(),
                                  "bit_equal": torch.equal(kept, dequantized),
                                  "same_greedy_tokens": torch.equal(kept.argmax(-1), dequantized.argmax(-1))}
    return rows


def main() -> None:
    args = parse_args()
    if args.quantized_weights == "both":
        with tempfile.TemporaryDirectory() as scratch:
            result = {"preset": args.preset, "layers": args.layers, "experts": args.experts, "device": args.device,
                      "tokens": args.tokens, **compare_modes(make_folder(args, Path(scratch) / "released"), args)}
        print(json.dumps(result, indent=2))
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"]) / "deepseek_v4_quantized_modes.json"
            out.write_text(json.dumps(result, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = make_folder(args, Path(scratch) / "released")
        stored_bytes = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        model, seconds = load(folder, args.device, keep_quantized=args.quantized_weights == "keep")
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        device_bytes = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
        host_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # writer + load (mapped file pages count)
        host = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.bfloat16, device="cpu",
                                                 keep_quantized=args.quantized_weights == "keep")
        mismatched = [name for (name, ours), (_, theirs) in zip(model.state_dict().items(), host.state_dict().items())
                      if not torch.equal(ours.cpu(), theirs)]
    result = {"preset": args.preset, "layers": args.layers, "experts": args.experts, "device": args.device,
              "load_s": round(seconds, 3), "stored_bytes": stored_bytes, "bf16_parameter_bytes": parameter_bytes,
              "peak_device_bytes": device_bytes, "host_peak_rss_bytes": host_rss,
              "tensors_differing_from_cpu_load": mismatched}
    print(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "deepseek_v4_released.json").write_text(json.dumps(result, indent=2) + "\n")
    if mismatched:
        raise SystemExit(f"{len(mismatched)} tensors differ between the {args.device} and the CPU load")


if __name__ == "__main__":
    main()
