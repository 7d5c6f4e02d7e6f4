"""KV tiers: bandwidth of every path against a ceiling measured in the same run, how Redis
throughput grows with shards and what stops it, and the TTFT of a repeated long context served
cold, from the device, from host memory, from Redis, or recomputed.

Run here:   python bench/kv_tiers.py                      (CPU; a few minutes on 2 cores)
GPU:        source .gpu/install.sh && PYTHONPATH=$PWD:$PYTHONPATH python3 bench/kv_tiers.py --device cuda
It starts its own redis-servers (from PATH) on free ports and stops them at the end.

Ceilings (bench/redis_ceilings.py): a single torch copy of the same bytes (pinned on CUDA) for
device<->host; `redis-benchmark -d <value bytes> -t set,get` (as many clients as our I/O threads
per server, one process per server, all at once, summed) for host<->Redis at the value size
actually stored (a part, when blocks are split). Tables:
  paths         each path for 16- and 64-token blocks (Llama-3-8B: 2 and 8 MiB)
  parts         8 MiB blocks stored whole or as parts of 4, 2, 1 MiB: which size Redis moves fastest
  shard scaling host<->Redis over 1, 2 and 4 servers, with the CPU seconds per GB of our client and
                of the servers, and `cpu_bound_GB_s`: the rate at which they would use every core of
                this host (when GB_s reaches it, cores are the limit, not Redis)
Writes bench/results/kv_tiers_<device>.json (or $OUT/kv_tiers_<device>.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch
from redis_ceilings import CpuClock, redis_ceiling_gbps, start_redis, stop_redis
from report import print_table, write_json  # bench/ is on sys.path when a script runs
from tier_engines import engine_for, make_ttft_model, release, settle, ttft_row

from cluster.config import KVTierSettings
from model_shards.kv_cache import KVCacheTensors
from model_shards.kv_io.kv_transfer import KVTransfer
from model_shards.kv_io.namespace import key_namespace, key_prefix
from model_shards.kv_io.redis_store import RedisBlockStore
from model_shards.kv_io.remote_block_io import RemoteBlockIO
from protocol.kv_transfer_ops import KVTransferOps

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MiB = 1 << 20


# --- one transfer engine over some redis-servers ------------------------------------------------
def make_transfer(args, device: torch.device, block_size: int, num_blocks: int, ports: list[int],
                  part_bytes: int | None) -> KVTransfer:
    cache = KVCacheTensors(num_blocks, args.layers, block_size, args.kv_heads, args.head_dim,
                           DTYPES[args.dtype], device)
    cache.data.view(torch.uint8).random_()  # every block distinct, like real KV

    def connect(fmt, slots):
        prefix = key_prefix("bench", key_namespace(f"bench|{block_size}", "none"))
        store = RedisBlockStore([f"redis://127.0.0.1:{port}" for port in ports], prefix, socket_timeout_s=30.0,
                                max_connections=args.io_threads, value_nbytes=fmt.header_nbytes + fmt.nbytes,
                                part_bytes=part_bytes)
        return RemoteBlockIO(store, fmt, slots, threads_per_shard=args.io_threads, max_pending_write_bytes=1 << 40)

    return KVTransfer(cache, num_blocks, chunk_bytes=64 << 20, remote_factory=connect)


def stored_value_bytes(transfer: KVTransfer) -> int:
    """Bytes of one Redis value: a whole block with its header, or one part of it."""
    return -(-(transfer.format.header_nbytes + transfer.format.nbytes) // transfer.remote.store.num_parts)


def run_until_done(transfer: KVTransfer, ops: KVTransferOps, expected: int, field: str) -> None:
    reports = [transfer.run(ops)]
    done = len(getattr(reports[0], field))
    while done < expected:
        report = transfer.run(KVTransferOps(poll_timeout_s=0.01))
        done += len(getattr(report, field))


def num_bench_blocks(args, block_size: int) -> int:
    """--blocks, or as many as make --transfer-mib."""
    block_bytes = args.layers * 2 * block_size * args.kv_heads * args.head_dim * DTYPES[args.dtype].itemsize
    return args.blocks or max(8, (args.transfer_mib * MiB) // block_bytes)


def best_of(repeats: int, run, device: torch.device, pids: tuple[int, ...] = ()) -> tuple[float, CpuClock]:
    """(seconds, CPU use) of the fastest of `repeats` runs."""
    best: tuple[float, CpuClock] = (float("inf"), CpuClock([]))
    for _ in range(repeats):
        synchronize(device)
        with CpuClock(list(pids)) as cpu:
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds = time.perf_counter() - started
        best = min(best, (seconds, cpu), key=lambda pair: pair[0])
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def redis_timings(transfer: KVTransfer, slots: list[int], hashes: list[bytes], device,
                  pids: tuple[int, ...]) -> dict[str, tuple[float, CpuClock]]:
    """Writing the slots to Redis under `hashes`, and fetching them back (best of 2 each)."""
    n = len(slots)
    return {"host_to_redis": best_of(2, lambda: run_until_done(
                transfer, KVTransferOps(write_throughs=tuple(zip(slots, hashes))), n, "written"), device, pids),
            "redis_to_host": best_of(2, lambda: run_until_done(
                transfer, KVTransferOps(fetches=tuple(zip(hashes, slots))), n, "fetched"), device, pids)}


def filled_transfer(args, device, block_size: int, ports: list[int], part_bytes: int | None):
    """A transfer engine whose host slots hold random blocks: (transfer, slots, hashes, bytes)."""
    n = num_bench_blocks(args, block_size)
    transfer = make_transfer(args, device, block_size, n, ports, part_bytes)
    rng = random.Random(0)
    slots, hashes = rng.sample(range(n), n), [rng.randbytes(32) for _ in range(n)]  # scattered, as in serving
    transfer.save(list(zip(range(n), slots)))
    return transfer, slots, hashes, n * transfer.kv.bytes_per_block


# --- table 1: every path --------------------------------------------------------------------
def bench_paths(args, device: torch.device, block_size: int, port: int) -> list[dict]:
    transfer, slots, hashes, nbytes = filled_transfer(args, device, block_size, [port], args.part_bytes)
    n = len(slots)
    rng = random.Random(1)
    blocks = rng.sample(range(n), n)
    timings = {
        "device_to_host": best_of(3, lambda: transfer.save(list(zip(blocks, slots))), device)[0],
        "host_to_device": best_of(3, lambda: transfer.load(list(zip(slots, blocks))), device)[0],
        **{path: seconds for path, (seconds, _) in redis_timings(transfer, slots, hashes, device, ()).items()},
    }
    timings["redis_to_device"] = best_of(2, lambda: (
        run_until_done(transfer, KVTransferOps(fetches=tuple(zip(hashes, slots))), n, "fetched"),
        transfer.load(list(zip(slots, blocks)))), device)[0]
    value_bytes = stored_value_bytes(transfer)
    transfer.close()
    return path_rows(args, timings, nbytes, block_size, transfer.format.nbytes, value_bytes, device, port)


def path_rows(args, timings: dict, nbytes: int, block_size: int, block_nbytes: int, value_bytes: int, device,
              port: int) -> list[dict]:
    copies = copy_ceiling_gbps(device, nbytes)
    redis = redis_ceiling_gbps([port], value_bytes, nbytes, args.io_threads)
    ceilings = {"device_to_host": (copies["device_to_host"], "torch copy"),
                "host_to_device": (copies["host_to_device"], "torch copy"),
                "host_to_redis": (redis["set"], "redis-benchmark SET"),
                "redis_to_host": (redis["get"], "redis-benchmark GET"),
                "redis_to_device": (_in_sequence(redis["get"], copies["host_to_device"]), "GET then torch copy")}
    rows = []
    for path, seconds in timings.items():
        gbps = nbytes / seconds / 1e9
        ceiling, source = ceilings[path]
        rows.append({"block_tokens": block_size, "block_MiB": round(block_nbytes / MiB, 2),
                     "value_MiB": round(value_bytes / MiB, 2), "path": path, "GB_s": round(gbps, 2),
                     **_against(gbps, ceiling), "ceiling": source})
    return rows


def copy_ceiling_gbps(device: torch.device, nbytes: int) -> dict[str, float]:
    """One torch copy of `nbytes` each way between device memory and (pinned) host memory."""
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    on_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return {"device_to_host": nbytes / best_of(3, lambda: on_host.copy_(on_device), device)[0] / 1e9,
            "host_to_device": nbytes / best_of(3, lambda: on_device.copy_(on_host), device)[0] / 1e9}


def _in_sequence(*rates: float | None) -> float | None:
    return None if None in rates else 1 / sum(1 / rate for rate in rates)


def _against(gbps: float, ceiling: float | None) -> dict:
    return {"ceiling_GB_s": None if ceiling is None else round(ceiling, 2),
            "of_ceiling": None if not ceiling else round(gbps / ceiling, 2)}


# --- table 2: parts -----------------------------------------------------------------------------
def bench_parts(args, device: torch.device, folder: str) -> list[dict]:
    """The largest --block-sizes entry (8 MiB at Llama-3-8B's shape) stored whole or in parts."""
    block_size = max(args.block_sizes)
    servers = [start_redis(folder)]
    try:
        rows = []
        for part_mib in args.part_sweep_mib:
            part_bytes = int(part_mib * MiB) if part_mib else None
            rows += redis_rows(args, device, block_size, servers, part_bytes)
        return rows
    finally:
        stop_redis(servers)


def redis_rows(args, device: torch.device, block_size: int, servers, part_bytes: int | None) -> list[dict]:
    """host<->Redis over these servers, against their summed ceilings, with CPU seconds per GB."""
    ports, pids = [port for _, port in servers], tuple(process.pid for process, _ in servers)
    transfer, slots, hashes, nbytes = filled_transfer(args, device, block_size, ports, part_bytes)
    timings = redis_timings(transfer, slots, hashes, device, pids)
    value_bytes, parts, block_nbytes = stored_value_bytes(transfer), transfer.remote.store.num_parts, transfer.format.nbytes
    transfer.close()
    ceiling = redis_ceiling_gbps(ports, value_bytes, nbytes, args.io_threads)
    rows = []
    for path, op in (("host_to_redis", "set"), ("redis_to_host", "get")):
        seconds, cpu = timings[path]
        gbps, gigabytes = nbytes / seconds / 1e9, nbytes / 1e9
        client, server = cpu.client_s / gigabytes, cpu.servers_s / gigabytes
        rows.append({"shards": len(ports), "block_MiB": round(block_nbytes / MiB, 2), "parts": parts,
                     "value_MiB": round(value_bytes / MiB, 2), "path": path, "GB_s": round(gbps, 2),
                     **_against(gbps, ceiling[op]), "ceiling": f"{len(ports)} x redis-benchmark {op.upper()}",
                     "client_cpu_s_per_GB": round(client, 3), "servers_cpu_s_per_GB": round(server, 3),
                     "cpu_bound_GB_s": round(os.cpu_count() / (client + server), 2) if client + server else None})
    return rows


# --- table 3: shard scaling ----------------------------------------------------------------------
def bench_shard_scaling(args, device: torch.device, folder: str) -> list[dict]:
    """host<->Redis over 1, 2, 4... fresh redis-servers (blocks sharded by hash), each count
    against as many concurrent redis-benchmark runs; `x_1_shard` is the gain over one server."""
    rows: list[dict] = []
    for count in args.shard_counts:
        servers = [start_redis(folder) for _ in range(count)]
        try:
            rows += redis_rows(args, device, args.block_sizes[0], servers, args.part_bytes)
        finally:
            stop_redis(servers)
    for row in rows:
        one_shard = next((r for r in rows if r["path"] == row["path"] and r["shards"] == 1), None)
        row["x_1_shard"] = round(row["GB_s"] / one_shard["GB_s"], 2) if one_shard else None
    return rows


def cores_note(args) -> str:
    """Whether this host has the cores for shards to scale at all."""
    needed = max(args.shard_counts) * (args.io_threads + 1)  # our threads and one server each
    cores = os.cpu_count()
    if cores >= needed:
        return f"{cores} CPUs: enough for {max(args.shard_counts)} shards x {args.io_threads} threads + servers"
    return (f"only {cores} CPUs for {max(args.shard_counts)} shards x {args.io_threads} client threads + "
            f"{max(args.shard_counts)} servers ({needed} busy threads): shards cannot scale on this host")


# --- table 4: TTFT of a repeated long context --------------------------------------------------
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


# --- main -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="KV dtype of the bandwidth part")
    parser.add_argument("--layers", type=int, default=32, help="block shape: Llama-3-8B by default")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64], help="tokens per block")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per transfer (default: --transfer-mib)")
    parser.add_argument("--transfer-mib", type=int, default=512, help="bytes per timed transfer")
    parser.add_argument("--part-bytes", type=int, default=KVTierSettings().redis_value_part_bytes,
                        help="Redis value parts (kv_tiers.redis_value_part_bytes)")
    parser.add_argument("--part-sweep-mib", type=float, nargs="*", default=[0, 4, 2, 1],
                        help="part sizes of the parts table (0: whole blocks); none: no table")
    parser.add_argument("--context-tokens", type=int, default=None, help="TTFT document (default 8K CPU, 32K GPU)")
    parser.add_argument("--ttft-layers", type=int, default=2, help="GPU TTFT model: Llama-3-8B shape, this many layers")
    parser.add_argument("--repeats", type=int, default=3, help="documents per TTFT scenario (best run kept)")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--io-threads", type=int, default=KVTierSettings().redis_io_threads,
                        help="our Redis I/O threads per shard, and redis-benchmark clients per server")
    parser.add_argument("--shard-counts", type=int, nargs="*", default=[1, 2, 4],
                        help="redis-servers of the shard-scaling table (first --block-sizes entry); none: no table")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.context_tokens = args.context_tokens or (32768 if cuda else 8192)
    args.model_dtype = "bfloat16" if cuda else "float32"
    args.ttft_block_size = 64
    args.max_tokens_per_step = 8192 if cuda else 2048
    args.host_bytes = 1 << 30
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "cpus": os.cpu_count(), "io_threads_per_shard": args.io_threads,
                     "block_shape": [args.layers, 2, "block_tokens", args.kv_heads, args.head_dim], "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as folder:
        threads = torch.get_num_threads()
        if device.type == "cpu":  # torch's thread pool on a small shared VM made copies erratic
            torch.set_num_threads(1)
        servers = [start_redis(folder)]
        try:
            results["bandwidth"] = [row for block_size in args.block_sizes
                                    for row in bench_paths(args, device, block_size, servers[0][1])]
            print_table(f"KV tier bandwidth ({name}, {args.dtype}, GB/s)", results["bandwidth"])
            write_results(results, device)
            if args.part_sweep_mib:
                results["parts"] = bench_parts(args, device, folder)
                print_table(f"Redis value parts ({name}, one server, GB/s)", results["parts"])
                write_results(results, device)
            if args.shard_counts:
                results["shard_scaling"] = bench_shard_scaling(args, device, folder)
                results["cores_note"] = cores_note(args)
                print_table(f"Redis shard scaling ({name}, {results['cores_note']})", results["shard_scaling"])
                write_results(results, device)
            torch.set_num_threads(threads)
            if not args.skip_ttft:
                model_dir, vocab = make_ttft_model(args, folder, args.context_tokens)
                results["ttft"] = bench_ttft(args, model_dir, f"redis://127.0.0.1:{servers[0][1]}", vocab)
                print_table(f"TTFT of a repeated {args.context_tokens}-token context (best of {args.repeats})",
                            results["ttft"])
        finally:
            stop_redis(servers)
    write_results(results, device)


def write_results(results: dict, device: torch.device) -> None:
    """Rewritten after each table: a run cut short keeps the tables it finished."""
    write_json(f"kv_tiers_{'cuda' if device.type == 'cuda' else 'cpu'}", results)


if __name__ == "__main__":
    main()
