"""DeepSeek-V4 through the engine on its paged hybrid KV cache: prefill and decode time against the
unpaged model (one in-memory SequenceState, what the runner did before the pages), and KV bytes
per token on the pages against the config's formula. One command, a table, and JSON.

CPU, the tiny preset (the issue's CPU figure: a 32K-token prefill):
    python3 bench/deepseek_v4_paged.py
GPU (one H200), the flash shape's first 4 layers with 16 experts, bf16:
    python3 bench/deepseek_v4_paged.py --preset deepseek-v4-flash-shape --device cuda --lengths 8192 32768 131072

Engine: one request of each length, `--chunk-tokens` per step, then `--decode-steps` greedy
tokens (TTFT and TPOT from engine/offline.py's timings). Unpaged: the model itself, prefill in
the same chunks, then as many single-token steps. Writes $OUT/deepseek_v4_paged.json if OUT is
set, else bench/results/deepseek_v4_paged.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/deepseek_v4_paged.py`

from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.offline import generate  # noqa: E402
from model_folder.deepseek_v4_config import parse_deepseek_v4_config  # noqa: E402
from model_folder.deepseek_v4_kv_budget import kv_bytes_per_token  # noqa: E402
from model_shards.deepseek_v4.kv_pages import compressed_layout  # noqa: E402
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM  # noqa: E402
from model_shards.deepseek_v4.presets import make_deepseek_v4_model, preset_config  # noqa: E402
from protocol.sampling_params import SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v4-tiny")
    parser.add_argument("--layers", type=int, default=4, help="flash shape: the first N of its 43 layers")
    parser.add_argument("--experts", type=int, default=16, help="flash shape: routed experts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--chunk-tokens", type=int, default=16384)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    return parser.parse_args()


def make_folder(args: argparse.Namespace) -> Path:
    out = Path(tempfile.mkdtemp(prefix="dsv4-paged-"))
    if args.preset == "deepseek-v4-tiny":
        return make_deepseek_v4_model(out, args.preset)
    return make_deepseek_v4_model(out, args.preset, layers=args.layers, n_routed_experts=args.experts)


def engine_timing(folder: Path, args: argparse.Namespace, length: int) -> dict[str, float]:
    engine = LLMEngine(LongctxConfig(
        model=ModelSettings(path=str(folder), device=args.device, dtype=args.dtype),
        cache=CacheSettings(num_device_blocks=length // 16 + 64),
        scheduler=SchedulerSettings(max_tokens_per_step=args.chunk_tokens, max_num_seqs=4)))
    prompt = [random.Random(length).randrange(3, 1000) for _ in range(length)]
    params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0, ignore_eos=True)
    try:
        result = generate(engine, [prompt], params)[0][0]
    finally:
        engine.shutdown()
    return {"prefill_s": result.ttft_s, "decode_ms_per_token": result.tpot_s * 1e3}


@torch.inference_mode()
def unpaged_timing(model: DeepseekV4ForCausalLM, args: argparse.Namespace, length: int) -> dict[str, float]:
    ids = torch.tensor([random.Random(length).randrange(3, 1000) for _ in range(length)], device=model.device)
    state = model.new_state()
    start = time.perf_counter()
    for first in range(0, length, args.chunk_tokens):
        hidden = model(ids[first:first + args.chunk_tokens], state)
    token = model.compute_logits(hidden[-1:]).argmax(-1)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.decode_steps):
        token = model.compute_logits(model(token, state)).argmax(-1)
    return {"prefill_s": prefill_s, "decode_ms_per_token": (time.perf_counter() - start) / args.decode_steps * 1e3}


def kv_bytes() -> dict[str, float]:
    flash = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))
    layout = compressed_layout(flash, flash.kv_block_multiple, torch.bfloat16)
    return {"flash_43_layers_pages_bytes_per_token": layout.nbytes / flash.kv_block_multiple,
            "flash_43_layers_formula_bytes_per_token": kv_bytes_per_token(flash)["total"]}


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    folder = make_folder(args)
    model = DeepseekV4ForCausalLM.from_folder(folder, device=args.device,
                                              dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    rows = []
    for length in args.lengths:
        rows.append({"length": length, "engine_paged": engine_timing(folder, args, length),
                     "model_unpaged": unpaged_timing(model, args, length)})
        print(json.dumps(rows[-1]), flush=True)
    report = {"preset": args.preset, "device": args.device, "threads": torch.get_num_threads(),
              "chunk_tokens": args.chunk_tokens, "rows": rows, "kv": kv_bytes()}
    print(json.dumps(report["kv"]))
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "deepseek_v4_paged.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
