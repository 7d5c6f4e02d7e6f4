"""DeepSeek-V4 blocks in the host and Redis tiers: bytes written per computed token, bytes read
per restored token and host capacity in tokens, before (one slot and one Redis value per block,
both parts) and after (window parts in their own pool and keys, kept every
`window_part_interval_blocks`-th block and at sequence ends), computed from the page layouts
(model_shards/deepseek_v4/kv_pages.py) and the host split (protocol/host_slots.py). CPU, no model.

    python3 bench/deepseek_v4_tier_bytes.py [--interval 16] [--host-gib 64]

Writes assume long prompts (a sequence end per `--tokens-per-sequence` tokens); reads a restore of
`--restored` tokens (whole blocks). Prints a markdown table; $OUT/deepseek_v4_tier_bytes.json if OUT
is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python3 bench/deepseek_v4_tier_bytes.py`

from model_folder.deepseek_v4_config import parse_deepseek_v4_config  # noqa: E402
from model_shards.deepseek_v4.kv_pages import compressed_layout, window_layout  # noqa: E402
from model_shards.deepseek_v4.presets import preset_config  # noqa: E402
from protocol.host_slots import split_host_bytes  # noqa: E402

PRESETS = (("deepseek-v4-tiny", torch.float32, 16), ("deepseek-v4-flash-shape", torch.bfloat16, 128))


def rows_for(preset: str, dtype: torch.dtype, block: int, args) -> list[dict]:
    arch = parse_deepseek_v4_config(preset_config(preset))
    compressed, window = compressed_layout(arch, block, dtype).nbytes, window_layout(arch, block, dtype).nbytes
    host_bytes = int(args.host_gib * (1 << 30))
    before = split_host_bytes(host_bytes, compressed + window)
    after = split_host_bytes(host_bytes, compressed, window, args.interval)
    # Window parts per block written: the checkpoints, and two sequence ends per sequence.
    window_share = 1 / args.interval + 2 * block / args.tokens_per_sequence
    rows = []
    for restored in args.restored:
        blocks = max(1, restored // block)
        rows.append({
            "preset": preset, "layers": arch.num_hidden_layers, "block_tokens": block,
            "compressed_bytes": compressed, "window_bytes": window, "restored_tokens": blocks * block,
            "written_B_per_token_before": round((compressed + window) / block),
            "written_B_per_token_after": round((compressed + window_share * window) / block),
            "redis_read_B_per_token_before": round(blocks * (compressed + window) / (blocks * block)),
            "read_B_per_token_after": round((blocks * compressed + window) / (blocks * block)),
            "host_tokens_before": before.num_blocks * block, "host_tokens_after": after.num_blocks * block,
            "host_window_parts_after": after.num_window_parts,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=16, help="kv_tiers.window_part_interval_blocks")
    parser.add_argument("--host-gib", type=float, default=64.0, help="kv_tiers.host_bytes, GiB")
    parser.add_argument("--tokens-per-sequence", type=int, default=131072)
    parser.add_argument("--restored", type=int, nargs="+", default=[8192, 131072, 1048576])
    args = parser.parse_args()
    rows = [row for preset, dtype, block in PRESETS for row in rows_for(preset, dtype, block, args)]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(value) for value in row.values()) + " |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "deepseek_v4_tier_bytes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
