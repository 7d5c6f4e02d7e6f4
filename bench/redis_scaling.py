"""Where the Redis client loses as shards grow, and which value sizes keep transfers at line rate.

Run here:   python bench/redis_scaling.py              (CPU: checks the script; 2 cores cannot scale)
GPU host:   source .gpu/install.sh && PYTHONPATH=$PWD:$PYTHONPATH python3 bench/redis_scaling.py --device cuda
It starts its own redis-servers on free ports and stops them at the end.

Table 1, shards (1, 2, 4 servers, 2 MiB values, GET only), every reader against the summed
`redis-benchmark` GET ceiling of the same servers measured in the same run:
  raw chunked   threads reading values with one recv per arrival (the client of session 3:
                a socket with a Python timeout), no verification, no copy
  raw waitall   the same, the rest of each value in one MSG_WAITALL receive (the client now)
  raw procs     raw waitall in one process per shard: no GIL shared between shards
  client        the block store's whole fetch (model_shards/kv_io/remote_block_io.py): parse,
                verify (crc32), copy into the host slots; with 4 and 8 I/O threads per shard
If threads lose to processes, the GIL stops them; if procs lose to the ceiling too, the sockets
or cores do (client and servers' CPU seconds per GB are given).

Table 2, value sizes (one server, 64 KiB .. 8 MiB): the client both ways and a batched
host <-> device copy of blocks that size, each against its ceiling (redis-benchmark at that size;
one pinned torch copy of all the bytes). DeepSeek-V4 stores ~6.4 KiB per token over its 43 layers
(model_folder/deepseek_v4_kv_budget.py), so `v4_tokens_per_block` is the block size that makes a
value that large.
Writes $OUT/redis_scaling_<device>.json (or bench/results/).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import tempfile
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import redis
import torch
from kv_tiers import best_of, copy_ceiling_gbps, filled_transfer, redis_timings
from redis_ceilings import CpuClock, redis_ceiling_gbps, start_redis, stop_redis
from report import print_table, write_json  # bench/ is on sys.path when a script runs

from model_shards.kv_io.resp import RespConnection

MiB = 1 << 20
V4_BYTES_PER_TOKEN = 6584  # DeepSeek-V4 (flash shape), 43 layers, bf16: measured state = formula
LLAMA_BYTES_PER_TOKEN_LAYER = 2 * 8 * 128 * 2  # K and V, 8 heads of 128, bf16: 4 KiB


class ChunkedRespConnection(RespConnection):
    """Session 3's receive: as many recv calls as the data arrives in (for comparison only);
    counts them."""

    receives = 0

    def _read_exact_into(self, view: memoryview) -> None:
        buffered = min(len(view), self._end - self._start)
        view[:buffered] = self._buffer[self._start : self._start + buffered]
        self._start += buffered
        filled = buffered
        while filled < len(view):
            filled += self.sock.recv_into(view[filled:])
            self.receives += 1


# --- raw readers ----------------------------------------------------------------------------
def read_keys(port: int, keys: list[bytes], value_bytes: int, threads: int, chunked: bool,
              pipeline: int = 2) -> int:
    """GET every key over `threads` connections (pipelines of `pipeline`), into reused buffers;
    the receives a chunked reader made for value bodies (0 otherwise)."""
    kind = ChunkedRespConnection if chunked else RespConnection

    def worker(share: list[bytes]) -> int:
        connection = kind({"host": "127.0.0.1", "port": port}, 30.0)
        if chunked:
            connection.sock.settimeout(30.0)  # a Python timeout: non-blocking underneath
        buffer = memoryview(bytearray(value_bytes))
        for start in range(0, len(share), pipeline):
            connection.get_many(share[start : start + pipeline], lambda index, length: buffer[:length])
        connection.close()
        return getattr(connection, "receives", 0)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(worker, [keys[i::threads] for i in range(threads)]))


def _process_main(port: int, keys: list[bytes], value_bytes: int, threads: int, barrier, stamps) -> None:
    barrier.wait()
    started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
    read_keys(port, keys, value_bytes, threads, chunked=False)
    stamps.put((started, time.monotonic()))


def read_in_processes(ports: list[int], keys: dict[int, list[bytes]], value_bytes: int, threads: int) -> float:
    """One process per server, started together; seconds from the first start to the last end
    (interpreter start-up and exit left out)."""
    context = multiprocessing.get_context("spawn")  # the parent may hold CUDA: never fork it
    barrier, stamps = context.Barrier(len(ports)), context.Queue()
    processes = [context.Process(target=_process_main, args=(port, keys[port], value_bytes, threads, barrier, stamps))
                 for port in ports]
    for process in processes:
        process.start()
    spans = [stamps.get(timeout=300) for _ in processes]
    for process in processes:
        process.join()
    return max(end for _, end in spans) - min(start for start, _ in spans)


def fill_servers(ports: list[int], total_bytes: int, value_bytes: int) -> dict[int, list[bytes]]:
    """total_bytes of random values spread over the servers: their keys by port."""
    per_server = max(1, total_bytes // value_bytes // len(ports))
    value = os.urandom(value_bytes)
    keys = {}
    for port in ports:
        client = redis.Redis(port=port)
        keys[port] = [f"bench:{i}".encode() for i in range(per_server)]
        for start in range(0, per_server, 16):
            pipe = client.pipeline(transaction=False)
            for key in keys[port][start : start + 16]:
                pipe.set(key, value)
            pipe.execute()
        client.close()
    return keys


def threads_in_parallel(ports: list[int], keys: dict[int, list[bytes]], value_bytes: int, threads: int,
                        chunked: bool, receives: list[int]) -> None:
    """Every server's keys read at once, `threads` threads each; appends the receives made."""
    with ThreadPoolExecutor(len(ports)) as pool:
        receives.append(sum(pool.map(lambda port: read_keys(port, keys[port], value_bytes, threads, chunked),
                                     ports)))


# --- table 1: shards ------------------------------------------------------------------------
def shard_rows(args, device: torch.device, folder: str, count: int) -> list[dict]:
    servers = [start_redis(folder) for _ in range(count)]
    ports, pids = [port for _, port in servers], [process.pid for process, _ in servers]
    try:
        keys = fill_servers(ports, args.transfer_mib * MiB, args.value_bytes)
        nbytes = sum(len(k) for k in keys.values()) * args.value_bytes
        rows, num_values = [], sum(len(k) for k in keys.values())
        for name, chunked in (("raw chunked", True), ("raw waitall", False)):
            receives: list[int] = []
            rows.append(_row(count, name, nbytes, *timed(lambda: threads_in_parallel(
                ports, keys, args.value_bytes, args.io_threads, chunked, receives), pids)))
            rows[-1]["receives_per_value"] = round(receives[-1] / num_values, 1) if chunked else 1
        seconds = min(read_in_processes(ports, keys, args.value_bytes, args.io_threads) for _ in range(2))
        rows.append(_row(count, "raw procs", nbytes, seconds, None))
        for threads in args.client_threads:
            rows.append(client_row(args, device, ports, pids, threads))
        ceiling = redis_ceiling_gbps(ports, args.value_bytes, nbytes, args.io_threads)["get"]
        for row in rows:
            row["ceiling_GB_s"] = None if ceiling is None else round(ceiling, 2)
            row["of_ceiling"] = None if not ceiling else round(row["GB_s"] / ceiling, 2)
        return rows
    finally:
        stop_redis(servers)


def timed(run, pids: list[int]) -> tuple[float, CpuClock]:
    """(seconds, CPU use) of the faster of two runs."""
    best = (float("inf"), CpuClock([]))
    for _ in range(2):
        with CpuClock(pids) as cpu:
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
        best = min(best, (seconds, cpu), key=lambda pair: pair[0])
    return best


def client_row(args, device: torch.device, ports: list[int], pids: list[int], threads: int) -> dict:
    block_tokens = max(1, args.value_bytes // (args.layers * LLAMA_BYTES_PER_TOKEN_LAYER))
    shape = _transfer_args(args, threads)
    transfer, slots, hashes, nbytes = filled_transfer(shape, device, block_tokens, ports, None)
    seconds, cpu = redis_timings(transfer, slots, hashes, device, tuple(pids))["redis_to_host"]
    transfer.close()
    return _row(len(ports), f"client {threads} threads", nbytes, seconds, cpu)


def _transfer_args(args, threads: int) -> Namespace:
    """kv_tiers.make_transfer's arguments: Llama-3-8B KV heads, args.layers layers."""
    return Namespace(layers=args.layers, kv_heads=8, head_dim=128, dtype="bfloat16", io_threads=threads,
                     blocks=None, transfer_mib=args.transfer_mib)


def _row(shards: int, reader: str, nbytes: int, seconds: float, cpu: CpuClock | None) -> dict:
    gigabytes = nbytes / 1e9
    return {"shards": shards, "reader": reader, "GB_s": round(gigabytes / seconds, 2), "receives_per_value": None,
            "client_cpu_s_per_GB": None if cpu is None else round(cpu.client_s / gigabytes, 3),
            "servers_cpu_s_per_GB": None if cpu is None else round(cpu.servers_s / gigabytes, 3)}


# --- table 2: value sizes ----------------------------------------------------------------------
def value_size_rows(args, device: torch.device, folder: str, rows: list[dict], saved) -> None:
    """Appends a row per value size and calls saved() after each (a run cut short keeps them)."""
    servers = [start_redis(folder)]
    port, pids = servers[0][1], (servers[0][0].pid,)
    try:
        for value_kib in args.value_kib:
            value_bytes = value_kib << 10
            block_tokens = max(1, value_bytes // LLAMA_BYTES_PER_TOKEN_LAYER)
            shape = _transfer_args(Namespace(**{**vars(args), "layers": 1}), args.io_threads)
            transfer, slots, hashes, nbytes = filled_transfer(shape, device, block_tokens, [port], None)
            redis_s = redis_timings(transfer, slots, hashes, device, pids)
            pairs = list(zip(slots, range(len(slots))[::-1]))  # scattered, as in serving
            load_s = best_of(3, lambda: transfer.load(pairs), device)[0]
            save_s = best_of(3, lambda: transfer.save([(b, s) for s, b in pairs]), device)[0]
            transfer.close()
            ceiling = redis_ceiling_gbps([port], value_bytes, nbytes, args.io_threads)
            copies = copy_ceiling_gbps(device, nbytes)
            rows.append({"value_KiB": value_kib, "v4_tokens_per_block": round(value_bytes / V4_BYTES_PER_TOKEN),
                         **_rate("redis_to_host", nbytes, redis_s["redis_to_host"][0], ceiling["get"]),
                         **_rate("host_to_redis", nbytes, redis_s["host_to_redis"][0], ceiling["set"]),
                         **_rate("host_to_device", nbytes, load_s, copies["host_to_device"]),
                         **_rate("device_to_host", nbytes, save_s, copies["device_to_host"])})
            print_table(f"value size {value_kib} KiB", rows[-1:])
            saved()
    finally:
        stop_redis(servers)


def _rate(path: str, nbytes: int, seconds: float, ceiling: float | None) -> dict:
    gbps = nbytes / seconds / 1e9
    return {f"{path}_GB_s": round(gbps, 2), f"{path}_of_ceiling": None if not ceiling else round(gbps / ceiling, 2)}


# --- main -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard-counts", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--value-bytes", type=int, default=2 * MiB, help="shard table: bytes per value")
    parser.add_argument("--layers", type=int, default=16, help="shard table: block = this many Llama layers of 16 "
                        "tokens (16: 2 MiB with its header just over)")
    parser.add_argument("--io-threads", type=int, default=4, help="reader threads per shard, redis-benchmark clients")
    parser.add_argument("--client-threads", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--transfer-mib", type=int, default=256, help="bytes per timed transfer")
    parser.add_argument("--value-kib", type=int, nargs="*", default=[64, 256, 1024, 2048, 4096, 8192])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "cpus": os.cpu_count(), "host": socket.gethostname(),
                     "value_bytes": args.value_bytes, "io_threads": args.io_threads}
    out = f"redis_scaling_{'cuda' if device.type == 'cuda' else 'cpu'}"
    with tempfile.TemporaryDirectory() as folder:
        results["shards"] = []
        for count in args.shard_counts:
            results["shards"] += shard_rows(args, device, folder, count)
            print_table(f"Redis -> host over {count} shard(s), {args.value_bytes >> 20} MiB values ({name}, "
                        f"{os.cpu_count()} CPUs)", [r for r in results["shards"] if r["shards"] == count])
            write_json(out, results)
        if args.value_kib:
            results["value_sizes"] = []
            value_size_rows(args, device, folder, results["value_sizes"], lambda: write_json(out, results))
            print_table(f"Transfer rate by value size ({name}, one Redis server, {args.io_threads} threads)",
                        results["value_sizes"])
    write_json(out, results)


if __name__ == "__main__":
    main()
