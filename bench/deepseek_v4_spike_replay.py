"""Replays session 5's H200 run of bench/deepseek_v4_paged.py through Triton's specialization rules
as the V4 kernels were then, and prints which prefill chunks met a new compile key beside the
chunks' measured times (docs/measurements/session5-H200-deepseek_v4_paged.json). CPU only, a second.

    python3 bench/deepseek_v4_spike_replay.py

Before session 7 (flash shape, 16384-token chunks, one H200, block bound 2^28 elements):
- `_index_scores` (CSA, rate 4) ran per block of 2^28 // E queries, E the entries closed at the
  chunk's end, with specialized ints tokens, entries (closed at the block's end) and first position;
- `_sink_softmax` (HCA, rate 128, window 128, 64 heads) ran per block of 2^28 // (64 (128 + E))
  queries with the entries closed at the block's end as its second key count, and a block size
  of min(2048, next_power_of_2(128 + count)).
Triton's key for an int: 1, a multiple of 16 ("D") or neither. The process ran, in order: the
warm-up prompt (2 chunks + 5 tokens), 32K, 128K, then 1M, each on the engine first.
"""

from __future__ import annotations

import json
from pathlib import Path

CHUNK, BOUND, CSA_RATE, HCA_RATE, HEADS, WINDOW = 16384, 1 << 28, 4, 128, 64, 128
MEASURED = Path(__file__).resolve().parent.parent / "docs/measurements/session5-H200-deepseek_v4_paged.json"


def divisibility(value: int) -> str:
    return "1" if value == 1 else ("D" if value % 16 == 0 else "-")


def next_power_of_2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def index_score_keys(start: int, tokens: int) -> set[tuple]:
    block = max(1, BOUND // max(1, (start + tokens) // CSA_RATE))
    return {("index_scores", divisibility(min(tokens, first + block) - first),
             divisibility((start + min(tokens, first + block)) // CSA_RATE), divisibility(start + first))
            for first in range(0, tokens, block)}


def softmax_keys(start: int, tokens: int) -> set[tuple]:
    block = max(1, BOUND // (HEADS * (WINDOW + (start + tokens) // HCA_RATE)))
    counts = [(start + min(tokens, first + block)) // HCA_RATE for first in range(0, tokens, block)]
    return {("sink_softmax", divisibility(count) if count else None, min(2048, next_power_of_2(WINDOW + count)))
            for count in counts}


def new_keys_per_chunk(length: int, seen: set[tuple]) -> dict[int, list[tuple]]:
    new = {}
    for chunk, start in enumerate(range(0, length, CHUNK)):
        keys = index_score_keys(start, min(CHUNK, length - start)) | softmax_keys(start, min(CHUNK, length - start))
        if fresh := sorted(keys - seen, key=str):
            new[chunk] = fresh
            seen |= keys
    return new


def main() -> None:
    measured = {row["length"]: row["engine_paged"]["prefill_chunk_device_ms"]
                for row in json.loads(MEASURED.read_text())["rows"]}
    seen: set[tuple] = set()
    new_keys_per_chunk(2 * CHUNK + 5, seen)  # the warm-up prompt
    report = []
    print(f"{'length':>8} {'chunk':>5} {'engine ms':>9} {'neighbours ms':>13}  new compile keys")
    for length in (32768, 131072, 1048000):
        times = measured[length]
        for chunk, keys in new_keys_per_chunk(length, seen).items():
            around = [times[i] for i in (chunk - 1, chunk + 1) if 0 <= i < len(times)]
            print(f"{length:>8} {chunk:>5} {times[chunk]:>9.0f} {sum(around) / len(around):>13.0f}  {keys}")
            report.append({"length": length, "chunk": chunk, "engine_ms": times[chunk], "keys": [list(k) for k in keys]})
        spikes = [i for i in range(1, len(times) - 1) if times[i] > 1.5 * max(times[i - 1], times[i + 1])]
        print(f"{length:>8} measured spikes (1.5x both neighbours): chunks {spikes}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
