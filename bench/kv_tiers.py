"""KV tiers: bandwidth of every path against a ceiling measured in the same run, and TTFT of a
repeated long context served cold, from the device, from host memory, from Redis, or recomputed.

Run here:   python bench/kv_tiers.py                      (CPU; a few minutes on 2 cores)
GPU:        source .gpu/install.sh && PYTHONPATH=$PWD:$PYTHONPATH python3 bench/kv_tiers.py --device cuda
It starts its own redis-server (from PATH) on a free port and stops it at the end. Ceilings:
a single torch copy of the same bytes (pinned on CUDA) for device<->host, and `redis-benchmark
-d <value bytes> -t set,get` (same value size, as many clients as I/O threads) for Redis; the
Redis->device path is set against both hops in sequence. Shard scaling: host<->Redis over 1, 2
and 4 redis-servers (`--shard-counts`, each set started here), each against as many
redis-benchmark processes run at once, one per server, their rates summed. Prints tables and
writes bench/results/kv_tiers_<device>.json (or $OUT/kv_tiers_<device>.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import torch
from report import print_table, write_json  # bench/ is on sys.path when a script runs

from cluster.config import (
    CacheSettings,
    KVTierSettings,
    LongctxConfig,
    ModelSettings,
    SchedulerSettings,
)
from engine.llm_engine import LLMEngine
from engine.offline import generate
from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_io.kv_transfer import KVTransfer
from model_shards.kv_io.namespace import key_namespace, key_prefix
from model_shards.kv_io.redis_store import RedisBlockStore
from model_shards.kv_io.remote_block_io import RemoteBlockIO
from model_shards.make_model import make_model
from protocol.kv_transfer_ops import KVTransferOps
from protocol.sampling_params import SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IO_THREADS = 4


# --- redis-server and redis-benchmark ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not on PATH (GPU machine: source .gpu/install.sh)")
    port = free_port()
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            if redis.Redis(port=port).ping():
                return process, port
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("redis-server did not start")


def redis_benchmark() -> tuple[str, dict[str, str]] | None:
    """redis-benchmark from PATH, or beside the unpacked redis-server of .gpu/install.sh."""
    found = shutil.which("redis-benchmark")
    if found:
        return found, dict(os.environ)
    wrapper = shutil.which("redis-server")
    root = Path(wrapper).resolve().parent.parent if wrapper else None
    if root is None or not (root / "usr/bin/redis-benchmark").exists():
        return None
    env = dict(os.environ, LD_LIBRARY_PATH=str(root / "usr/lib/x86_64-linux-gnu"))
    return str(root / "usr/bin/redis-benchmark"), env


def redis_ceiling_gbps(ports: list[int], value_bytes: int, total_bytes: int) -> dict[str, float | None]:
    """SET and GET GB/s of `redis-benchmark -d value_bytes` with IO_THREADS clients, one process
    per server, all at once (total_bytes split between them); their rates summed."""
    tool = redis_benchmark()
    if tool is None:
        return {"set": None, "get": None}
    requests = max(2 * IO_THREADS, total_bytes // value_bytes // len(ports))
    # One key (no -r): every GET returns a whole value, and the server holds one value only.
    runs = [subprocess.Popen([tool[0], "-p", str(port), "-d", str(value_bytes), "-n", str(requests), "-c",
                              str(IO_THREADS), "-t", "set,get", "--csv"],
                             env=tool[1], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for port in ports]
    rates = [benchmark_rates(run.communicate(timeout=600)[0], value_bytes) for run in runs]
    return {op: None if any(op not in r for r in rates) else sum(r[op] for r in rates) for op in ("set", "get")}


def benchmark_rates(csv_output: str, value_bytes: int) -> dict[str, float]:
    rates = {}
    for line in csv_output.splitlines():
        fields = [field.strip('"') for field in line.split(",")]
        if fields and fields[0] in ("SET", "GET"):
            rates[fields[0].lower()] = float(fields[1]) * value_bytes / 1e9
    return rates


# --- bandwidth of each path ------------------------------------------------------------------
def copy_ceiling_gbps(device: torch.device, nbytes: int) -> dict[str, float]:
    """One torch copy of `nbytes` each way between device memory and (pinned) host memory."""
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    on_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return {"device_to_host": nbytes / best_of(3, lambda: on_host.copy_(on_device), device) / 1e9,
            "host_to_device": nbytes / best_of(3, lambda: on_device.copy_(on_host), device) / 1e9}


def best_of(repeats: int, run, device: torch.device) -> float:
    timings = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return min(timings)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_transfer(args, device: torch.device, block_size: int, num_blocks: int, ports: list[int]) -> KVTransfer:
    cache = KVCacheTensors(num_blocks, args.layers, block_size, args.kv_heads, args.head_dim,
                           DTYPES[args.dtype], device)
    cache.data.view(torch.uint8).random_()  # every block distinct, like real KV

    def connect(fmt, slots):
        prefix = key_prefix("bench", key_namespace(f"bench|{block_size}", "none"))
        store = RedisBlockStore([f"redis://127.0.0.1:{port}" for port in ports], prefix, socket_timeout_s=30.0,
                                max_connections=args.io_threads)
        return RemoteBlockIO(store, fmt, slots, threads=args.io_threads, max_pending_write_bytes=1 << 40)

    return KVTransfer(cache, num_blocks, chunk_bytes=64 << 20, remote_factory=connect)


def run_until_done(transfer: KVTransfer, ops: KVTransferOps, expected: int, field: str) -> None:
    reports = [transfer.run(ops)]
    done = len(getattr(reports[0], field))
    while done < expected:
        report = transfer.run(KVTransferOps(poll_timeout_s=0.01))
        done += len(getattr(report, field))


def num_bench_blocks(args, block_size: int) -> int:
    """--blocks, or as many as make ~512 MiB."""
    block_bytes = args.layers * 2 * block_size * args.kv_heads * args.head_dim * DTYPES[args.dtype].itemsize
    return args.blocks or max(8, (512 << 20) // block_bytes)


def redis_timings(transfer: KVTransfer, slots: list[int], hashes: list[bytes], device) -> dict[str, float]:
    """Seconds to write the slots to Redis under `hashes`, and to fetch them back (best of 2)."""
    n = len(slots)
    return {"host_to_redis": best_of(2, lambda: run_until_done(
                transfer, KVTransferOps(write_throughs=tuple(zip(slots, hashes))), n, "written"), device),
            "redis_to_host": best_of(2, lambda: run_until_done(
                transfer, KVTransferOps(fetches=tuple(zip(hashes, slots))), n, "fetched"), device)}


def bench_paths(args, device: torch.device, block_size: int, port: int) -> list[dict]:
    """Time each path over the same scattered blocks (~512 MiB unless --blocks says otherwise)."""
    n = num_bench_blocks(args, block_size)
    transfer = make_transfer(args, device, block_size, n, [port])
    nbytes = n * transfer.kv.bytes_per_block
    rng = random.Random(0)
    blocks, slots = rng.sample(range(n), n), rng.sample(range(n), n)  # scattered, as in serving
    hashes = [rng.randbytes(32) for _ in range(n)]
    timings = {
        "device_to_host": best_of(3, lambda: transfer.save(list(zip(blocks, slots))), device),
        "host_to_device": best_of(3, lambda: transfer.load(list(zip(slots, blocks))), device),
        **redis_timings(transfer, slots, hashes, device),
    }
    timings["redis_to_device"] = best_of(2, lambda: (
        run_until_done(transfer, KVTransferOps(fetches=tuple(zip(hashes, slots))), n, "fetched"),
        transfer.load(list(zip(slots, blocks)))), device)
    transfer.close()
    return path_rows(timings, nbytes, block_size, transfer.format.nbytes, device, port)


def path_rows(timings: dict, nbytes: int, block_size: int, block_nbytes: int, device, port: int) -> list[dict]:
    copies = copy_ceiling_gbps(device, nbytes)
    value_bytes = block_nbytes + 256  # the header: a few dozen bytes, rounded up
    redis = redis_ceiling_gbps([port], value_bytes, nbytes)
    ceilings = {"device_to_host": (copies["device_to_host"], "torch copy"),
                "host_to_device": (copies["host_to_device"], "torch copy"),
                "host_to_redis": (redis["set"], "redis-benchmark SET"),
                "redis_to_host": (redis["get"], "redis-benchmark GET"),
                "redis_to_device": (_in_sequence(redis["get"], copies["host_to_device"]), "GET then torch copy")}
    rows = []
    for path, seconds in timings.items():
        gbps = nbytes / seconds / 1e9
        ceiling, source = ceilings[path]
        rows.append({"block_tokens": block_size, "block_MiB": round(block_nbytes / 2**20, 2), "path": path,
                     "GB_s": round(gbps, 2), "ceiling_GB_s": None if ceiling is None else round(ceiling, 2),
                     "of_ceiling": None if not ceiling else round(gbps / ceiling, 2), "ceiling": source})
    return rows


def _in_sequence(*rates: float | None) -> float | None:
    return None if None in rates else 1 / sum(1 / rate for rate in rates)


# --- shard scaling ------------------------------------------------------------------------
def bench_shard_scaling(args, device: torch.device, folder: str) -> list[dict]:
    """host<->Redis over 1, 2, 4... fresh redis-servers (blocks sharded by hash), each count
    against as many concurrent redis-benchmark runs; `x_1_shard` is the gain over one server."""
    block_size = args.block_sizes[0]
    rows: list[dict] = []
    for count in args.shard_counts:
        servers = [start_redis(folder) for _ in range(count)]
        try:
            rows += shard_rows(args, device, block_size, [port for _, port in servers])
        finally:
            for process, _ in servers:
                process.kill()
                process.wait()
    for row in rows:
        one_shard = next((r for r in rows if r["path"] == row["path"] and r["shards"] == 1), None)
        row["x_1_shard"] = round(row["GB_s"] / one_shard["GB_s"], 2) if one_shard else None
    return rows


def shard_rows(args, device: torch.device, block_size: int, ports: list[int]) -> list[dict]:
    n = num_bench_blocks(args, block_size)
    transfer = make_transfer(args, device, block_size, n, ports)
    nbytes, block_nbytes = n * transfer.kv.bytes_per_block, transfer.format.nbytes
    rng = random.Random(0)
    slots, hashes = rng.sample(range(n), n), [rng.randbytes(32) for _ in range(n)]
    transfer.save(list(zip(range(n), slots)))
    timings = redis_timings(transfer, slots, hashes, device)
    transfer.close()
    ceiling = redis_ceiling_gbps(ports, block_nbytes + 256, nbytes)  # + the header, rounded up
    rows = []
    for path, op in (("host_to_redis", "set"), ("redis_to_host", "get")):
        gbps = nbytes / timings[path] / 1e9
        rows.append({"shards": len(ports), "block_tokens": block_size, "block_MiB": round(block_nbytes / 2**20, 2),
                     "path": path, "GB_s": round(gbps, 2),
                     "ceiling_GB_s": None if ceiling[op] is None else round(ceiling[op], 2),
                     "of_ceiling": None if not ceiling[op] else round(gbps / ceiling[op], 2),
                     "ceiling": f"{len(ports)} x redis-benchmark {op.upper()}"})
    return rows


# --- TTFT of a repeated long context --------------------------------------------------------
def engine_for(args, model_dir: str, num_blocks: int, redis_url: str | None, **tiers) -> LLMEngine:
    tier_settings = KVTierSettings(redis_urls=(redis_url,), **tiers) if redis_url else KVTierSettings(**tiers)
    engine = LLMEngine(LongctxConfig(
        model=ModelSettings(path=model_dir, dtype=args.model_dtype, device=args.device),
        cache=CacheSettings(block_size=args.ttft_block_size, num_device_blocks=num_blocks),
        scheduler=SchedulerSettings(max_tokens_per_step=args.max_tokens_per_step),
        kv_tiers=tier_settings))
    generate(engine, [list(range(10, 74))], SamplingParams(max_tokens=2))  # warm-up: kernels, allocator
    return engine


def ttft_row(scenario: str, engine: LLMEngine, prompt: list[int]) -> dict:
    result = generate(engine, [prompt], SamplingParams(max_tokens=1))[0][0]
    host, redis = result.num_host_hit_tokens, result.num_redis_hit_tokens
    return {"scenario": scenario, "ttft_s": round(result.ttft_s, 4),
            "device_hit_tokens": result.num_prefix_hit_tokens - host - redis, "host_hit_tokens": host,
            "redis_hit_tokens": redis, "computed_tokens": len(prompt) - result.num_prefix_hit_tokens}


COLD, DEVICE, HOST, REDIS, RECOMPUTE = ("cold (computes, writes through)", "device hit", "host hit",
                                        "redis hit (another engine)", "recompute (no tiers)")


def bench_ttft(args, model_dir: str, redis_url: str, vocab: int) -> list[dict]:
    """Every scenario on `--repeats` different documents; the fastest run of each is reported."""
    rng = random.Random(1)
    docs = [[rng.randrange(10, vocab) for _ in range(args.context_tokens)] for _ in range(2 * args.repeats)]
    pairs = list(zip(docs[::2], docs[1::2]))  # (document, filler)
    num_blocks = -(-args.context_tokens // args.ttft_block_size) + 10  # one document and a little
    tiers = {"host_bytes": args.host_bytes, "restore_policy": "always"}
    runs: dict[str, list[dict]] = {name: [] for name in (COLD, DEVICE, HOST, REDIS, RECOMPUTE)}
    served = engine_for(args, model_dir, num_blocks, redis_url, **tiers)
    for doc, filler in pairs:
        runs[COLD].append(ttft_row(COLD, served, doc))
        runs[DEVICE].append(ttft_row(DEVICE, served, doc))
        ttft_row("filler", served, filler)  # evicts the document from the device: it spills to host
        runs[HOST].append(ttft_row(HOST, served, doc))
    settle(served)
    release(served)
    for scenario, url in ((REDIS, redis_url), (RECOMPUTE, None)):  # a fresh engine: another replica
        engine = engine_for(args, model_dir, num_blocks, url, **(tiers if url else {}))
        runs[scenario] = [ttft_row(scenario, engine, doc) for doc, _ in pairs]
        release(engine)
    rows = [min(scenario_runs, key=lambda row: row["ttft_s"]) for scenario_runs in runs.values()]
    for row in rows:
        row["speedup"] = round(rows[-1]["ttft_s"] / row["ttft_s"], 2)
    return rows


def settle(engine: LLMEngine, timeout_s: float = 60.0) -> None:
    """Step an idle engine until its background Redis writes are done (so another replica sees them)."""
    deadline = time.monotonic() + timeout_s
    while engine.kv_cache.tiers.num_pending and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.001)


def release(engine: LLMEngine) -> None:
    engine.shutdown()
    if engine.config.model.device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- main -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="KV dtype of the bandwidth part")
    parser.add_argument("--layers", type=int, default=32, help="block shape: Llama-3-8B by default")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64], help="tokens per block")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per transfer (default: ~512 MiB)")
    parser.add_argument("--context-tokens", type=int, default=None, help="TTFT document (default 8K CPU, 32K GPU)")
    parser.add_argument("--ttft-layers", type=int, default=2, help="GPU TTFT model: Llama-3-8B shape, this many layers")
    parser.add_argument("--repeats", type=int, default=3, help="documents per TTFT scenario (best run kept)")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--io-threads", type=int, default=IO_THREADS,
                        help="our Redis I/O threads (the ceiling keeps IO_THREADS clients per server)")
    parser.add_argument("--shard-counts", type=int, nargs="+", default=[1, 2, 4],
                        help="redis-servers of the shard-scaling phase (first --block-sizes entry)")
    parser.add_argument("--skip-shard-scaling", action="store_true")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.context_tokens = args.context_tokens or (32768 if cuda else 8192)
    args.model_dtype = "bfloat16" if cuda else "float32"
    args.ttft_block_size = 64
    args.max_tokens_per_step = 8192 if cuda else 2048
    args.host_bytes = 1 << 30
    return args


def make_ttft_model(args, folder: str) -> tuple[str, int]:
    folder = Path(folder) / "model"
    if args.device.startswith("cuda"):
        path = make_model(folder, "llama3-8b-shape", num_hidden_layers=args.ttft_layers,
                          max_position_embeddings=max(131072, 2 * args.context_tokens))
        return str(path), 128_256
    return str(make_model(folder, "tiny", seed=1, max_position_embeddings=max(16384, 2 * args.context_tokens))), 1024


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "block_shape": [args.layers, 2, "block_tokens", args.kv_heads, args.head_dim],
                     "dtype": args.dtype, "io_threads": args.io_threads}
    with tempfile.TemporaryDirectory() as folder:
        process, port = start_redis(folder)
        try:
            threads = torch.get_num_threads()
            if device.type == "cpu":  # torch's thread pool on a small shared VM made copies erratic
                torch.set_num_threads(1)
            results["bandwidth"] = [row for block_size in args.block_sizes
                                    for row in bench_paths(args, device, block_size, port)]
            results["bandwidth_torch_threads"] = torch.get_num_threads()
            print_table(f"KV tier bandwidth ({name}, {args.dtype}, GB/s)", results["bandwidth"])
            if not args.skip_shard_scaling:
                results["shard_scaling"] = bench_shard_scaling(args, device, folder)
                print_table(f"Redis shard scaling ({name}, {os.cpu_count()} CPUs, GB/s)", results["shard_scaling"])
            torch.set_num_threads(threads)
            if not args.skip_ttft:
                model_dir, vocab = make_ttft_model(args, folder)
                results["ttft"] = bench_ttft(args, model_dir, f"redis://127.0.0.1:{port}", vocab)
                print_table(f"TTFT of a repeated {args.context_tokens}-token context (best of {args.repeats})",
                            results["ttft"])
        finally:
            process.kill()
    write_results(results, "cuda" if device.type == "cuda" else "cpu")


def write_results(results: dict, device_kind: str) -> None:
    write_json(f"kv_tiers_{device_kind}", results)


if __name__ == "__main__":
    main()
