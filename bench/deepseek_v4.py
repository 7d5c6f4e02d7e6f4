"""DeepSeek-V4 (model_shards/deepseek_v4): exactness against transformers, prefill and decode speed,
KV state bytes against the config's figure. One command, a table, and JSON.

GPU (one H200), real per-layer shapes (DeepSeek-V4-Flash), the first --layers layers, fewer experts:
    python3 bench/deepseek_v4.py
CPU, the tiny preset, a 32K-token prefill (the issue's CPU figure):
    python3 bench/deepseek_v4.py --preset deepseek-v4-tiny --device cpu --lengths 32768 --check-length 400

(a) exactness: float32, ours (whole prompt, then odd chunks + decode) against transformers' full
    forward over the same sequence: max |logit difference| and greedy agreement;
(b) speed: ours in the model dtype (bf16 for the flash shape), prefill in --chunk-token chunks at
    each length, then --decode-steps single-token steps; transformers' full forward at the
    lengths up to --hf-max-length for comparison (it materialises (tokens x tokens) per layer);
(c) KV state: measured bytes of the compressed entries after the longest prompt against
    kv_budget.entry_bytes, and the per-token figure for the 43-layer flash shape.
Writes $OUT/deepseek_v4.json if OUT is set, else bench/results/deepseek_v4.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/deepseek_v4.py`

from model_folder.deepseek_v4_config import parse_deepseek_v4_config  # noqa: E402
from model_folder.deepseek_v4_kv_budget import entry_bytes, kv_bytes_per_token, max_fixed_bytes_per_request  # noqa: E402
from model_shards.deepseek_v4.model import DeepseekV4ForCausalLM  # noqa: E402
from model_shards.deepseek_v4.presets import make_deepseek_v4_model, preset_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek-v4-flash-shape")
    parser.add_argument("--layers", type=int, default=4, help="flash shape: the first N of its 43 layers")
    parser.add_argument("--experts", type=int, default=16, help="flash shape: routed experts (256 in V4-Flash)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--chunk-tokens", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--check-length", type=int, default=2048)
    parser.add_argument("--hf-max-length", type=int, default=8192)
    parser.add_argument("--folder", default=None, help="reuse a folder made by an earlier run")
    return parser.parse_args()


def make_folder(args: argparse.Namespace) -> Path:
    if args.folder and (Path(args.folder) / "config.json").is_file():
        return Path(args.folder)
    out = Path(args.folder or tempfile.mkdtemp(prefix="dsv4-"))
    if args.preset == "deepseek-v4-tiny":
        return make_deepseek_v4_model(out, args.preset)
    return make_deepseek_v4_model(out, args.preset, layers=args.layers, n_routed_experts=args.experts,
                                  vocab_size=32768)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model: DeepseekV4ForCausalLM, ids: torch.Tensor, chunk: int, state=None,
             last_only: bool = False) -> tuple[torch.Tensor, float]:
    """Logits of every position (or of each chunk's last one) and the seconds it took."""
    state = state if state is not None else model.new_state()
    synchronize(model.device)
    start, logits = time.perf_counter(), []
    for i in range(0, len(ids), chunk):
        hidden = model(ids[i:i + chunk], state)
        logits.append(model.compute_logits(hidden[-1:] if last_only else hidden))
    synchronize(model.device)
    return torch.cat(logits), time.perf_counter() - start


def reference_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import DeepseekV4ForCausalLM as ReferenceModel

    reference = ReferenceModel.from_pretrained(folder, dtype=dtype).to(ids.device).eval()
    with torch.no_grad():
        logits = reference(ids[None], use_cache=False).logits[0].float()
    del reference
    return logits


def ours_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=dtype, device=ids.device)
    return run_ours(model, ids, chunk)[0]


def check_exactness(folder: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """float32: ours whole and in 997-token chunks against transformers' full forward; then bf16,
    ours and transformers', each against that float32 truth (bf16 cannot be exact: compare errors)."""
    vocab = 30000 if args.preset != "deepseek-v4-tiny" else 1000
    ids = torch.randint(0, vocab, (args.check_length,), generator=torch.Generator().manual_seed(0)).to(device)
    truth = reference_logits(folder, ids, torch.float32)
    row = {"length": len(ids), "logit_max_abs": truth.abs().max().item()}
    for name, logits in (("fp32_whole", ours_logits(folder, ids, torch.float32, len(ids))),
                         ("fp32_chunks_997", ours_logits(folder, ids, torch.float32, 997)),
                         ("bf16_ours", ours_logits(folder, ids, torch.bfloat16, len(ids))),
                         ("bf16_transformers", reference_logits(folder, ids, torch.bfloat16))):
        difference = (logits - truth).abs()
        row[name] = {"max_abs": difference.max().item(), "mean_abs": difference.mean().item(),
                     "greedy_agreement": (logits.argmax(-1) == truth.argmax(-1)).float().mean().item()}
    return row


def measure_speed(folder: Path, args: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict]:
    model = DeepseekV4ForCausalLM.from_folder(folder, device=device)
    rows, state = [], None
    for length in args.lengths:
        ids = torch.randint(0, 30000 if args.preset != "deepseek-v4-tiny" else 1000, (length,)).to(device)
        state = model.new_state()
        _, prefill = run_ours(model, ids, args.chunk_tokens, state, last_only=True)
        decode_ids = ids[:args.decode_steps]
        _, decode = run_ours(model, decode_ids, 1, state, last_only=True)
        rows.append({"length": length, "prefill_s": prefill, "prefill_tok_s": length / prefill,
                     "decode_ms_per_token": 1000 * decode / max(1, len(decode_ids))})
        print(f"  ours {length:>8}: prefill {prefill:8.2f} s  decode {rows[-1]['decode_ms_per_token']:7.1f} ms/token",
              flush=True)
    return rows, state_bytes(model, state)


def state_bytes(model: DeepseekV4ForCausalLM, state) -> dict:
    element = torch.empty(0, dtype=model.dtype).element_size()
    measured = state.nbytes()
    expected = entry_bytes(model.arch, state.num_tokens, element)
    return {"tokens": state.num_tokens, "element_bytes": element,
            "measured_entries": {k: measured[f"{k}/entries"] for k in expected}, "expected_entries": expected,
            "measured_fixed": sum(v for k, v in measured.items() if k.endswith("/fixed")),
            "max_fixed": max_fixed_bytes_per_request(model.arch, element)}


def measure_reference(folder: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    from transformers import DeepseekV4ForCausalLM as ReferenceModel

    reference = ReferenceModel.from_pretrained(folder).to(device).eval()
    rows = []
    for length in [n for n in args.lengths if n <= args.hf_max_length]:
        ids = torch.randint(0, 1000, (1, length)).to(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            reference(ids, use_cache=False, logits_to_keep=1)
        synchronize(device)
        rows.append({"length": length, "prefill_s": time.perf_counter() - start})
    return rows


def transformers_has_v4() -> bool:
    try:
        from transformers import DeepseekV4ForCausalLM  # noqa: F401
    except ImportError:
        return False
    return True


def write(results: dict) -> None:
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "deepseek_v4.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    folder = make_folder(args)
    results: dict = {"preset": args.preset, "device": str(device), "folder": str(folder),
                     "flash_kv_bytes_per_token_bf16": kv_bytes_per_token(
                         parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape")))}
    if not transformers_has_v4():
        print("transformers without DeepseekV4ForCausalLM here: no exactness check, no reference timing")
    results["exactness"] = check_exactness(folder, args, device) if transformers_has_v4() else None
    print("exactness (against transformers' float32 full forward):", json.dumps(results["exactness"], indent=1),
          flush=True)
    write(results)
    results["ours"], results["state_bytes"] = measure_speed(folder, args, device)
    write(results)
    results["transformers_full_forward"] = measure_reference(folder, args, device) if transformers_has_v4() else []
    write(results)
    print(f"{'length':>8} {'ours prefill s':>15} {'tok/s':>10} {'decode ms':>10} {'HF full fwd s':>14}")
    hf = {row["length"]: row["prefill_s"] for row in results["transformers_full_forward"]}
    for row in results["ours"]:
        print(f"{row['length']:>8} {row['prefill_s']:>15.2f} {row['prefill_tok_s']:>10.0f} "
              f"{row['decode_ms_per_token']:>10.1f} {hf.get(row['length'], float('nan')):>14.2f}")
    print("state bytes:", results["state_bytes"])


if __name__ == "__main__":
    main()
