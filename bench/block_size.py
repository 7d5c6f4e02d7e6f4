"""How the KV block size costs on a GPU: paged decode reads and spill copies, per block size.

Run on a CUDA machine: `python bench/block_size.py` (about a minute on an H100). Shapes are one
layer of an 8B Llama-3 (32 query heads, 8 KV heads, head dim 128, bf16) for attention, and all 32
layers of a block for spills (the cache is block-major: one block = 32 x 2 x block_size x 8 x 128).
Each figure comes with its ceiling measured in the same run:
  * decode: the reference backend (gather blocks, then SDPA) vs SDPA on the same K/V already
    contiguous, and the HBM rate those bytes would need;
  * spill: one copy per block vs one batched gather + copy, vs one large pinned copy.
The control-plane side (hashing, scheduler step) is in bench/engine_cpu.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from model_shards.attention.base import AttentionMetadata
from model_shards.attention.torch_sdpa import TorchSDPABackend, attend

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
BLOCK_SIZES = (16, 64, 256)
DTYPE = torch.bfloat16


def cuda_time_ms(fn, iterations: int = 20) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events), after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_decode(block_size: int, context_len: int) -> dict:
    """One decode token attending over a shuffled paged context of one layer."""
    num_blocks = context_len // block_size
    layer_cache = torch.randn(num_blocks, 2, block_size, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    block_table = torch.randperm(num_blocks).tolist()  # fragmented, as after hours of serving
    metadata = AttentionMetadata.build([(block_table, context_len - 1, 1)], block_size, "cuda")
    query = torch.randn(1, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    new_kv = torch.randn(1, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    backend = TorchSDPABackend()
    paged_ms = cuda_time_ms(lambda: backend.forward(query, new_kv, new_kv, layer_cache, metadata, HEAD_DIM**-0.5))
    keys = torch.randn(context_len, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    contiguous_ms = cuda_time_ms(lambda: attend(query, keys, keys, HEAD_DIM**-0.5))
    kv_bytes = 2 * context_len * KV_HEADS * HEAD_DIM * 2
    return {
        "block_size": block_size, "context": context_len,
        "paged_ms": round(paged_ms, 3), "contiguous_sdpa_ms": round(contiguous_ms, 3),
        "paged_GBps": round(kv_bytes / paged_ms / 1e6, 1), "hbm_floor_ms": round(kv_bytes / 2.95e9, 3),
    }


def bench_spill(block_size: int, spill_bytes: int = 1 << 30) -> dict:
    """Copy ~1 GiB of scattered whole blocks (all layers) device -> pinned host, two ways."""
    block_shape = (LAYERS, 2, block_size, KV_HEADS, HEAD_DIM)
    block_bytes = torch.Size(block_shape).numel() * 2
    num_spilled = max(1, spill_bytes // block_bytes)
    cache = torch.empty((2 * num_spilled, *block_shape), device="cuda", dtype=DTYPE)
    block_ids = torch.randperm(2 * num_spilled, device="cuda")[:num_spilled]
    host = torch.empty((num_spilled, *block_shape), dtype=DTYPE, pin_memory=True)
    id_list = block_ids.tolist()

    def per_block():
        for slot, block_id in enumerate(id_list):
            host[slot].copy_(cache[block_id], non_blocking=True)

    def batched():
        host.copy_(cache.index_select(0, block_ids), non_blocking=True)

    ceiling_ms = cuda_time_ms(lambda: host.copy_(cache[:num_spilled], non_blocking=True), 5)
    moved = num_spilled * block_bytes
    return {
        "block_size": block_size, "block_MiB": round(block_bytes / 2**20, 2), "blocks": num_spilled,
        "per_block_GBps": round(moved / cuda_time_ms(per_block, 5) / 1e6, 1),
        "batched_GBps": round(moved / cuda_time_ms(batched, 5) / 1e6, 1),
        "pinned_ceiling_GBps": round(moved / ceiling_ms / 1e6, 1),
    }


def print_rows(title: str, rows: list[dict]) -> None:
    print(title)
    columns = list(rows[0])
    print("  ".join(f"{c:>18}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]!s:>18}" for c in columns))
    print()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/block_size.py needs CUDA")
    decode = [bench_decode(bs, context) for context in (131_072, 1_048_576) for bs in BLOCK_SIZES]
    spill = [bench_spill(bs) for bs in BLOCK_SIZES]
    print_rows("decode attention, one layer of an 8B model (reference paged backend vs contiguous SDPA)", decode)
    print_rows("spill of whole blocks (32 layers) device -> pinned host", spill)
    results = {"device": torch.cuda.get_device_name(), "decode": decode, "spill": spill}
    out_dir = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "block_size.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
