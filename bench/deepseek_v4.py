"""DeepSeek-V4 (model_shards/deepseek_v4): exactness against transformers, prefill and decode speed
with a per-component profile and achieved TFLOP/s, KV state bytes against the config's figure.
One command, tables, and JSON.

GPU (one H200), real per-layer shapes (DeepSeek-V4-Flash), the first --layers layers, fewer experts:
    python3 bench/deepseek_v4.py
CPU, the tiny preset, a 32K-token prefill (the issue's CPU figure):
    python3 bench/deepseek_v4.py --preset deepseek-v4-tiny --device cpu --lengths 32768 --check-length 400

(a) exactness: float32, ours (whole prompt, then odd chunks) against transformers' full forward
    over the same sequence; then bf16, ours and transformers', against that float32 truth
    (max |logit difference|, greedy agreement; bf16 tolerance: ours no worse than transformers');
(b) kernels (GPU): the fused indexer scores against the float32 torch reference, the grouped
    experts against a per-expert loop, the bf16 matmul rate of this GPU (the ceiling);
(c) speed: ours in the model dtype, prefill in --chunk-tokens chunks at each length (out of
    memory is caught per length), decode ms/token after each prefill, whether a decode step
    synchronizes with the host; achieved TFLOP/s from the counted FLOPs (deepseek_v4_flops.py);
(d) profile (GPU): exclusive ms per component (deepseek_v4_sections.py) of a prefill at each
    --profile-lengths and of decode after the longest of them;
(e) transformers' full forward time at the lengths up to --hf-max-length;
(f) KV state: measured bytes of the compressed entries after the longest prompt against
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deepseek_v4_flops import chunk_flops, prefill_flops  # noqa: E402
from deepseek_v4_sections import SectionTimer  # noqa: E402
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    parser.add_argument("--profile-lengths", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--chunk-tokens", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--check-length", type=int, default=2048, help="0: no exactness check")
    parser.add_argument("--hf-max-length", type=int, default=8192)
    parser.add_argument("--no-kernel-checks", action="store_true")
    parser.add_argument("--folder", default=None, help="reuse a folder made by an earlier run")
    parser.add_argument("--label", default="ours", help="the JSON file's name: deepseek_v4[_label].json")
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


def random_ids(args: argparse.Namespace, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    vocab = 1000 if args.preset == "deepseek-v4-tiny" else 30000  # the tokenizer's ordinary ids
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).to(device)


# --- (a) exactness ------------------------------------------------------------------------------

def reference_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import DeepseekV4ForCausalLM as ReferenceModel

    reference = ReferenceModel.from_pretrained(folder, dtype=dtype).to(device=ids.device, dtype=dtype).eval()
    with torch.no_grad():
        logits = reference(ids[None], use_cache=False).logits[0].float()
    del reference
    return logits


def ours_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    model = DeepseekV4ForCausalLM.from_folder(folder, dtype=dtype, device=ids.device)
    return run_ours(model, ids, chunk)[0]


def check_exactness(folder: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """float32: ours whole and in 997-token chunks against transformers' full forward (1e-4 on
    CPU; a GPU's float32 matmuls move it to ~1e-4 too); bf16: ours and transformers' each against
    that float32 truth (bf16 cannot be exact: ours must be no worse than transformers')."""
    ids = random_ids(args, args.check_length, device)
    truth = reference_logits(folder, ids, torch.float32)
    row = {"length": len(ids), "logit_max_abs": truth.abs().max().item()}
    for name, logits in (("fp32_whole", ours_logits(folder, ids, torch.float32, len(ids))),
                         ("fp32_chunks_997", ours_logits(folder, ids, torch.float32, 997)),
                         ("bf16_ours", ours_logits(folder, ids, torch.bfloat16, len(ids))),
                         ("bf16_transformers", reference_logits(folder, ids, torch.bfloat16))):
        difference = (logits - truth).abs()
        row[name] = {"max_abs": difference.max().item(), "mean_abs": difference.mean().item(),
                     "greedy_agreement": (logits.argmax(-1) == truth.argmax(-1)).float().mean().item()}
    row["bf16_within_tolerance"] = row["bf16_ours"]["mean_abs"] <= 1.1 * row["bf16_transformers"]["mean_abs"]
    return row


# --- (b) kernels --------------------------------------------------------------------------------

def gpu_ms(function, repeats: int = 10) -> float:
    function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def matmul_tflops(device: torch.device) -> float:
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / gpu_ms(lambda: a @ b) / 1e9


def check_index_scores(device: torch.device) -> dict:
    """A 4096-query block against 32768 entries (a 128K context), flash shapes."""
    from model_shards.deepseek_v4.index_scores import index_scores_torch, index_scores_triton
    from model_shards.deepseek_v4.indexer import top_k_earliest_first, top_k_of_ranking

    q = torch.randn(4096, 64, 128, device=device, dtype=torch.bfloat16)
    weights, keys = torch.randn(4096, 64, device=device) / 64, torch.randn(32768, 128, device=device, dtype=torch.bfloat16)
    first = 4 * 32768 - 4096
    expected = index_scores_torch(q, weights, keys, first, 4)
    fused = index_scores_triton(q, weights, keys, first, 4)
    finite = expected > float("-inf")
    same_picks = (top_k_earliest_first(fused, 512) == top_k_earliest_first(expected, 512)).all(-1)
    row = {"max_abs": (fused - expected)[finite].abs().max().item(), "score_max_abs": expected[finite].abs().max().item(),
           "same_inf": bool(torch.equal(fused == float("-inf"), expected == float("-inf"))),
           "queries_with_equal_top512": same_picks.float().mean().item(),
           "torch_ms": gpu_ms(lambda: index_scores_torch(q, weights, keys, first, 4), 3),
           "top_k_from_scores_ms": gpu_ms(lambda: top_k_earliest_first(expected, 512), 3),
           "ranked_scores_and_top_k_ms": gpu_ms(lambda: top_k_of_ranking(
               index_scores_triton(q, weights, keys, first, 4, ranked=True), 512), 3)}
    flops = 2 * 64 * 128 * finite.sum().item()
    for tile in [(64, 128, 4), (128, 128, 8), (64, 256, 8)]:
        ms = gpu_ms(lambda: index_scores_triton(q, weights, keys, first, 4, *tile), 5)
        row[f"fused_ms_{tile[0]}x{tile[1]}w{tile[2]}"] = ms
        row[f"fused_tflops_{tile[0]}x{tile[1]}w{tile[2]}"] = flops / ms / 1e9
    return row


def check_grouped_experts(device: torch.device) -> dict:
    from model_shards.deepseek_v4.grouped_experts import grouped_linear, sort_by_expert

    experts = torch.randint(0, 16, (8192, 6), device=device)
    rows = sort_by_expert(experts, 16)
    x = torch.randn(8192 * 6, 4096, device=device, dtype=torch.bfloat16)
    weight = torch.randn(16, 4096, 4096, device=device, dtype=torch.bfloat16) / 64
    fast = grouped_linear(x, weight, rows.offsets).float()
    loop = grouped_linear(x.float(), weight.float(), rows.offsets)  # float32 on CUDA: the per-group loop
    ms = gpu_ms(lambda: grouped_linear(x, weight, rows.offsets), 5)
    return {"bf16_vs_fp32_max_rel": ((fast - loop).abs().max() / loop.abs().max()).item(),
            "grouped_mm_ms": ms, "grouped_mm_tflops": 2 * x.shape[0] * 4096 * 4096 / ms / 1e9}


# --- (c) speed, (d) profile ---------------------------------------------------------------------

def decode_syncs(model: DeepseekV4ForCausalLM, ids: torch.Tensor, state) -> str:
    """Run one decode step with CUDA's sync debug mode on: 'none', or the first sync's error."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.compute_logits(model(ids[:1], state))
        return "none"
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def measure_length(model: DeepseekV4ForCausalLM, args: argparse.Namespace, length: int) -> tuple[dict, object]:
    ids = random_ids(args, length, model.device, seed=length)
    state = model.new_state()
    _, prefill = run_ours(model, ids, args.chunk_tokens, state, last_only=True)
    _, decode = run_ours(model, ids[:args.decode_steps], 1, state, last_only=True)
    flops = sum(prefill_flops(model.arch, length, args.chunk_tokens).values())
    decode_flops = sum(sum(chunk_flops(model.arch, length + i, 1).values()) for i in range(args.decode_steps))
    row = {"length": length, "prefill_s": prefill, "prefill_tok_s": length / prefill,
           "prefill_tflops": flops / prefill / 1e12, "decode_ms_per_token": 1000 * decode / args.decode_steps,
           "decode_tflops": decode_flops / decode / 1e12}
    if model.device.type == "cuda":
        row["decode_host_syncs"] = decode_syncs(model, ids, state)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return row, state


def measure_speed(model: DeepseekV4ForCausalLM, args: argparse.Namespace) -> tuple[list[dict], dict | None]:
    warm_ids, warm_state = random_ids(args, 2 * args.chunk_tokens, model.device), model.new_state()
    run_ours(model, warm_ids, args.chunk_tokens, warm_state, last_only=True)  # warm-up: kernels compile
    run_ours(model, warm_ids[:4], 1, warm_state, last_only=True)  # for the decode shapes too
    rows, longest = [], None
    for length in args.lengths:
        try:
            row, state = measure_length(model, args, length)
            longest = state_bytes(model, state)
        except torch.OutOfMemoryError as error:
            row = {"length": length, "error": f"out of memory: {str(error).splitlines()[0]}"}
        state = None
        torch.cuda.empty_cache() if model.device.type == "cuda" else None
        rows.append(row)
        print(f"  {args.label} {length:>8}: {json.dumps(row)}", flush=True)
    return rows, longest


def profile(model: DeepseekV4ForCausalLM, args: argparse.Namespace) -> dict:
    """Exclusive ms per component: prefill at each profile length, then decode after the last."""
    results = {}
    for length in args.profile_lengths:
        ids = random_ids(args, length, model.device, seed=length)
        state = model.new_state()
        with SectionTimer() as timer:
            _, seconds = run_ours(model, ids, args.chunk_tokens, state, last_only=True)
        results[f"prefill_{length}"] = _with_rest(timer.exclusive_ms(), 1000 * seconds)
        with SectionTimer() as timer:
            _, seconds = run_ours(model, ids[:args.decode_steps], 1, state, last_only=True)
        results[f"decode_{length}_ms_per_token"] = {name: ms / args.decode_steps for name, ms in
                                                    _with_rest(timer.exclusive_ms(), 1000 * seconds).items()}
    return results


def _with_rest(sections: dict[str, float], wall_ms: float) -> dict[str, float]:
    return {"wall": wall_ms, **sections, "unattributed (host, launches)": wall_ms - sum(sections.values())}


def state_bytes(model: DeepseekV4ForCausalLM, state) -> dict:
    element = torch.empty(0, dtype=model.dtype).element_size()
    measured = state.nbytes()
    expected = entry_bytes(model.arch, state.num_tokens, element)
    return {"tokens": state.num_tokens, "element_bytes": element,
            "measured_entries": {k: measured[f"{k}/entries"] for k in expected}, "expected_entries": expected,
            "measured_fixed": sum(v for k, v in measured.items() if k.endswith("/fixed")),
            "max_fixed": max_fixed_bytes_per_request(model.arch, element)}


# --- (e) transformers ---------------------------------------------------------------------------

def measure_reference(folder: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    from transformers import DeepseekV4ForCausalLM as ReferenceModel

    reference = ReferenceModel.from_pretrained(folder, dtype=torch.bfloat16).to(device=device, dtype=torch.bfloat16).eval()
    rows = []
    for length in [n for n in args.lengths if n <= args.hf_max_length]:
        ids = random_ids(args, length, device)[None]
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


# --- driver -------------------------------------------------------------------------------------

def write(results: dict, label: str) -> None:
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"deepseek_v4{'' if label == 'ours' else '_' + label}.json").write_text(json.dumps(results, indent=1))


def print_tables(results: dict) -> None:
    hf = {row["length"]: row["prefill_s"] for row in results.get("transformers_full_forward", [])}
    print(f"{'length':>8} {'prefill s':>10} {'tok/s':>9} {'TFLOP/s':>8} {'decode ms':>10} {'syncs':>6} {'HF fwd s':>9}")
    for row in results["speed"]:
        if "error" in row:
            print(f"{row['length']:>8} {row['error']}")
            continue
        print(f"{row['length']:>8} {row['prefill_s']:>10.3f} {row['prefill_tok_s']:>9.0f} {row['prefill_tflops']:>8.1f} "
              f"{row['decode_ms_per_token']:>10.2f} {row.get('decode_host_syncs', '-')[:6]:>6} "
              f"{hf.get(row['length'], float('nan')):>9.2f}")
    for name, sections in results.get("profile", {}).items():
        print(f"profile {name} (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in sections.items()))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    folder = make_folder(args)
    arch = parse_deepseek_v4_config(preset_config("deepseek-v4-flash-shape"))
    results: dict = {"label": args.label, "preset": args.preset, "device": str(device), "folder": str(folder),
                     "flash_kv_bytes_per_token_bf16": kv_bytes_per_token(arch)}
    has_reference = transformers_has_v4()
    if device.type == "cuda" and not args.no_kernel_checks:
        results["kernels"] = {"matmul_bf16_tflops": matmul_tflops(device), "index_scores": check_index_scores(device),
                              "grouped_experts": check_grouped_experts(device)}
        print("kernels:", json.dumps(results["kernels"]), flush=True)
    if args.check_length and has_reference:
        results["exactness"] = check_exactness(folder, args, device)
        print("exactness (against transformers' float32 full forward):", json.dumps(results["exactness"]), flush=True)
    write(results, args.label)
    model = DeepseekV4ForCausalLM.from_folder(folder, device=device)
    results["speed"], results["state_bytes"] = measure_speed(model, args)
    write(results, args.label)
    if device.type == "cuda" and args.profile_lengths:
        results["profile"] = profile(model, args)
        write(results, args.label)
    del model
    if has_reference and args.hf_max_length:
        results["transformers_full_forward"] = measure_reference(folder, args, device)
    write(results, args.label)
    print_tables(results)
    print("state bytes:", results["state_bytes"])


if __name__ == "__main__":
    main()
