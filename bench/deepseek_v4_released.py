"""A DeepSeek-V4 folder in DeepSeek's released layout (FP8 blocks, FP4 experts) loaded onto a device:
load time, device bytes against the bf16 parameter bytes, the host's peak RSS, and the loaded
weights bit-equal to the same folder loaded on the CPU (dequantizing on CUDA, ue8m0 and FP4 there).

GPU (one H200), the flash shape's first --layers layers with --experts experts (a few minutes,
mostly writing the folder):
    python3 bench/deepseek_v4_released.py
CPU, the tiny preset:
    python3 bench/deepseek_v4_released.py --preset deepseek-v4-tiny --device cpu
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
    return parser.parse_args()


def make_folder(args: argparse.Namespace, out: Path) -> Path:
    overrides = {"n_routed_experts": args.experts} if args.preset != "deepseek-v4-tiny" else {}
    layers = args.layers if args.preset != "deepseek-v4-tiny" else None
    quantization = BlockQuantization(scale_format="ue8m0", expert_format=args.expert_dtype)
    return make_deepseek_v4_model(out, args.preset, layers=layers, quantization=quantization, **overrides)


def load(folder: Path, device: str) -> tuple[DeepseekV4ForCausalLM, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.bfloat16, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = make_folder(args, Path(scratch) / "released")
        stored_bytes = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        model, seconds = load(folder, args.device)
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        device_bytes = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
        host_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # writer + load (mapped file pages count)
        host = DeepseekV4ForCausalLM.from_folder(folder, dtype=torch.bfloat16, device="cpu")
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
