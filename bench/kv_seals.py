"""What authenticating KV blocks costs: GB/s of sealing (tag + copy into the value) and verifying
(header and tag) blocks with crc32 against HMAC-SHA256 (kv_tiers.redis_mac_key), on one thread
and on --io-threads threads, as the Redis I/O threads do off the decode path. CPU only.

    python bench/kv_seals.py                    # Llama-3-8B blocks of 16 and 64 tokens, bf16
Prints a table and writes bench/results/kv_seals.json (or $OUT/kv_seals.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_shards.kv_io.block_seal import CHECKSUM_SEAL, MacSeal, Seal  # noqa: E402
from model_shards.kv_io.codec import BlockFormat, decode_block, encode_block, encode_block_into  # noqa: E402
from protocol.kv_transfer_ops import HIT  # noqa: E402

SEALS = ("crc32", "hmac-sha256")
DTYPES = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def make_seal(name: str, context: bytes) -> Seal:
    return CHECKSUM_SEAL if name == "crc32" else MacSeal(b"a bench key of at least 16 bytes", context)


def bench_seals(args) -> list[dict]:
    """GB/s of sealing (encode: tag + copy into the value) and verifying (decode: header and tag)
    blocks, as the Redis I/O threads do off the decode path: crc32 against HMAC-SHA256, on one
    thread and on --io-threads threads at once."""
    rows = []
    for block_size in args.block_sizes:
        fmt = BlockFormat(args.dtype, (args.layers, 2, block_size, args.kv_heads, args.head_dim),
                          args.layers * 2 * block_size * args.kv_heads * args.head_dim * DTYPES[args.dtype].itemsize)
        num_blocks = max(2 * args.io_threads, (256 << 20) // fmt.nbytes)
        payloads = [random.Random(i).randbytes(fmt.nbytes) for i in range(num_blocks)]
        hashes = [bytes([i % 256]) * 32 for i in range(num_blocks)]
        for name in SEALS:
            seal = make_seal(name, b"bench:")
            for threads in sorted({1, args.io_threads}):
                encode_s, decode_s = seal_seconds(fmt, seal, payloads, hashes, threads)
                total = num_blocks * fmt.nbytes
                rows.append({"block_tokens": block_size, "block_MiB": round(fmt.nbytes / 2**20, 2), "seal": name,
                             "threads": threads, "seal_GB_s": round(total / encode_s / 1e9, 2),
                             "verify_GB_s": round(total / decode_s / 1e9, 2)})
    return rows


def seal_seconds(fmt: BlockFormat, seal: Seal, payloads: list[bytes], hashes: list[bytes],
                 threads: int) -> tuple[float, float]:
    """Seconds to encode every payload, then to decode every value, split over `threads` (best of 2)."""
    values = [encode_block(fmt, h, p, seal) for h, p in zip(hashes, payloads)]
    shares = [list(range(i, len(payloads), threads)) for i in range(threads)]

    def encode_share(share):
        out = bytearray(fmt.header_nbytes + fmt.nbytes)  # reused, as the I/O threads reuse theirs
        for i in share:
            encode_block_into(fmt, hashes[i], payloads[i], out, seal)

    def decode_share(share):
        for i in share:
            assert decode_block(fmt, hashes[i], values[i], seal)[0] == HIT

    with ThreadPoolExecutor(threads) as pool:
        timed = [min(_timed_run(pool, work, shares) for _ in range(2)) for work in (encode_share, decode_share)]
    return timed[0], timed[1]


def _timed_run(pool: ThreadPoolExecutor, work, shares) -> float:
    start = time.perf_counter()
    list(pool.map(work, shares))
    return time.perf_counter() - start




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--io-threads", type=int, default=4)
    args = parser.parse_args()
    rows = bench_seals(args)
    print(f"{'block':>6} {'MiB':>6} {'seal':>12} {'threads':>7} {'seal GB/s':>10} {'verify GB/s':>12}")
    for row in rows:
        print(f"{row['block_tokens']:>6} {row['block_MiB']:>6} {row['seal']:>12} {row['threads']:>7} "
              f"{row['seal_GB_s']:>10} {row['verify_GB_s']:>12}")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_seals.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
