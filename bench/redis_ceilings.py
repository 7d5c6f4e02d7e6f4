"""Shared by the KV-tier benches: private redis-servers, the redis-benchmark ceiling, CPU time.

A ceiling is `redis-benchmark -d <value bytes> -t set,get` with as many clients as our I/O
threads per server, one process per server, all at once, their rates summed: what Redis itself
serves on this host at that value size. CPU time is read from /proc (the servers) and
`time.process_time` (our client, every thread), so a bench can say which resource stopped it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


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


def stop_redis(servers: list[tuple[subprocess.Popen, int]]) -> None:
    for process, _ in servers:
        process.kill()
        process.wait()


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


def redis_ceiling_gbps(ports: list[int], value_bytes: int, total_bytes: int, clients: int) -> dict[str, float | None]:
    """SET and GET GB/s of `redis-benchmark -d value_bytes -c clients`, one process per server,
    all at once (total_bytes split between them); their rates summed."""
    tool = redis_benchmark()
    if tool is None:
        return {"set": None, "get": None}
    requests = max(2 * clients, total_bytes // value_bytes // len(ports))
    # One key (no -r): every GET returns a whole value, and the server holds one value only.
    runs = [subprocess.Popen([tool[0], "-p", str(port), "-d", str(value_bytes), "-n", str(requests), "-c",
                              str(clients), "-t", "set,get", "--csv"],
                             env=tool[1], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for port in ports]
    rates = [_benchmark_rates(run.communicate(timeout=600)[0], value_bytes) for run in runs]
    return {op: None if any(op not in r for r in rates) else sum(r[op] for r in rates) for op in ("set", "get")}


def _benchmark_rates(csv_output: str, value_bytes: int) -> dict[str, float]:
    rates = {}
    for line in csv_output.splitlines():
        fields = [field.strip('"') for field in line.split(",")]
        if fields and fields[0] in ("SET", "GET"):
            rates[fields[0].lower()] = float(fields[1]) * value_bytes / 1e9
    return rates


class CpuClock:
    """CPU seconds of this process (all threads) and of some other processes, between start()
    and stop()."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.client_s = self.servers_s = 0.0

    def __enter__(self) -> CpuClock:
        self._client, self._servers = time.process_time(), _cpu_seconds(self.pids)
        return self

    def __exit__(self, *exc) -> None:
        self.client_s = time.process_time() - self._client
        self.servers_s = _cpu_seconds(self.pids) - self._servers


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, from /proc (0 where unreadable)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total
