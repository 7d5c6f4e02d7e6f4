"""DeepSeek-V4's indexer top-k for one block of queries: the layers' int64 ranking (the scores
kernel writes `ordered(score) << 32 | (E - 1 - entry)`, then one top-k over those keys) against
`top_k_by_threshold` (float32 scores: each row's k-th value by torch's top-k or by our radix
select, then one pass choosing the entries, ties earliest first: threshold_top_k.py), on the block the layers
rank at once: 2^28 scores (block_elements on a GPU), E = context / 4 CSA entries, top-512.

GPU:  python3 bench/deepseek_v4_top_k.py
CPU:  python3 bench/deepseek_v4_top_k.py --smoke     (tiny sizes: checks the script)

Scores are ReLU-like (about half exactly 0, a tenth tied at one value) with each row's entries
past its position -inf, as a causal chunk's are. Per case: device ms (CUDA events, after a
warm-up), GB/s of the scores read once (4 bytes a float32 score; the int64 path reads 8) against
a device copy of the float32 block measured in the same run, and whether the indices equal the
int64 path's (they must: both are exact). Why: at 1M tokens the top-k was 113 ms of the last
chunk's 510 on an H100 (session 11), second only to attention.
Writes $OUT/deepseek_v4_top_k.json if OUT is set, else bench/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/...`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shards.deepseek_v4.index_scores import ranking_keys  # noqa: E402
from model_shards.deepseek_v4.indexer import top_k_of_ranking  # noqa: E402
from model_shards.deepseek_v4.threshold_top_k import top_k_by_threshold  # noqa: E402
from report import print_table, write_json  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[131072, 524288, 1048000])
    parser.add_argument("--rate", type=int, default=4, help="CSA's compress rate")
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--block-elements", type=int, default=1 << 28, help="scores ranked at once")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script")
    return parser.parse_args()


def relu_like_scores(rows: int, entries: int, first_position: int, rate: int, device: torch.device) -> torch.Tensor:
    """(rows, entries) float32: queries at first_position.. see the entries closed at their position."""
    generator = torch.Generator(device=device).manual_seed(entries)
    scores = torch.randn(rows, entries, generator=generator, device=device).clamp_(min=0)
    scores.masked_fill_(torch.rand(rows, entries, generator=generator, device=device) < 0.1, 0.5)
    closed = (first_position + torch.arange(rows, device=device) + 1) // rate
    return scores.masked_fill_(torch.arange(entries, device=device) >= closed[:, None], float("-inf"))


def event_ms(call, repeats: int, device: torch.device) -> float:
    """Mean ms of one call after a warm-up (CUDA events; wall time on a CPU)."""
    call()
    if device.type != "cuda":
        import time

        start = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - start) * 1e3 / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / repeats


def context_rows(args: argparse.Namespace, context: int, device: torch.device) -> list[dict]:
    entries = context // args.rate
    rows = max(1, min(args.block_elements // entries, context))
    scores = relu_like_scores(rows, entries, context - rows, args.rate, device)  # the chunk's last block
    ranked = ranking_keys(scores)  # what the scores kernel writes with ranked=True
    expected = top_k_of_ranking(ranked, args.topk)
    copy_ms = event_ms(lambda: scores.clone(), args.repeats, device)
    cases = {"int64 ranking (the layers' path)": (lambda: top_k_of_ranking(ranked, args.topk), 8),
             "threshold, k-th by torch's top-k": (lambda: top_k_by_threshold(scores, args.topk, "topk"), 4),
             "threshold, k-th by radix select": (lambda: top_k_by_threshold(scores, args.topk, "radix"), 4)}
    table = []
    for name, (call, bytes_per_score) in cases.items():
        ms = event_ms(call, args.repeats, device)
        read_gbs = rows * entries * bytes_per_score / ms / 1e6
        table.append({"case": name, "context": context, "rows x entries": f"{rows} x {entries}", "ms": round(ms, 2),
                      "GB/s read once": round(read_gbs, 1),
                      "x copy ms": round(ms / copy_ms, 1), "equal": bool(torch.equal(call(), expected))})
    table.append({"case": "copy of the float32 block (ceiling)", "context": context,
                  "rows x entries": f"{rows} x {entries}", "ms": round(copy_ms, 2),
                  "GB/s read once": round(2 * rows * entries * 4 / copy_ms / 1e6, 1), "x copy ms": 1.0, "equal": "-"})
    return table


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.context, args.topk, args.block_elements, args.repeats = [2048, 4096], 64, 1 << 16, 1
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args),
               "contexts": {}}
    for context in args.context:
        rows = context_rows(args, context, device)
        print_table(f"CSA top-{args.topk}, one block of queries at {context} tokens", rows)
        results["contexts"][str(context)] = rows
    write_json("deepseek_v4_top_k", results)


if __name__ == "__main__":
    main()
