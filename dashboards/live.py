"""A live longctx to point Prometheus at: a private redis-server, `longctx serve` on a tiny model
with all three KV tiers sized so that documents spill and come back, and traffic that exercises
every series the dashboards plot (tests/dashboards and pictures.py use it; it binds 127.0.0.1 only).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import yaml

from dashboards.prometheus import PrometheusServer, free_port

LONGCTX = Path(sys.executable).parent / "longctx"
REDIS_SERVER = shutil.which("redis-server")
DOCUMENT_TOKENS = 400
NUM_DOCUMENTS = 4
BURST = 8  # concurrent requests, more than fit the device cache at once: some wait, queued

# 16-token blocks of the tiny model are 8 KiB: the device holds 40 blocks (1.6 documents), the
# host tier 32 (1.3): cycling through 4 documents evicts each from both, so asking again restores
# it from Redis, and the documents in between from the host.
SERVE_CONFIG = {
    "cache": {"block_size": 16, "num_device_blocks": 40},
    "scheduler": {"max_tokens_per_step": 512},
    "kv_tiers": {"host_bytes": 32 * 8192, "restore_policy": "always"},
}


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """redis://127.0.0.1:<free port>/0 of a redis-server without persistence, killed on exit."""
    if REDIS_SERVER is None:
        raise FileNotFoundError("redis-server is not installed (make setup installs it)")
    port = free_port()
    process = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _redis_answers(port), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


@contextmanager
def longctx_serve(model_dir: str, workdir: Path, redis_url: str, port: int | None = None) -> Iterator[str]:
    """Base URL of `longctx serve` (its own embedded Ray) with SERVE_CONFIG and this Redis, on
    `port` (a free one if None)."""
    config = {**SERVE_CONFIG, "model": {"path": model_dir},
              "kv_tiers": {**SERVE_CONFIG["kv_tiers"], "redis_urls": [redis_url]}}
    config_file = workdir / "longctx.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port() if port is None else port
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = subprocess.Popen([str(LONGCTX), "serve", "--config", str(config_file), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=(workdir / "serve.log").open("w"), env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _healthy(url, process, workdir / "serve.log"), 180, "longctx serve")
        yield url
    finally:
        _stop(process, timeout_s=90)  # SIGTERM: drains, deletes the app, stops its Ray


def send_traffic(url: str, rounds: int = 3, pause_s: float = 0.5) -> dict[int, int]:
    """Cycle through the documents `rounds` times (spills, host and Redis restores), then send them
    all at once (queued context), stream a chat, and send two bad requests (400, 404); returns the
    count of each status code."""
    statuses: dict[int, int] = {}
    documents = [_document(seed) for seed in range(NUM_DOCUMENTS)]
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(BURST) as pool:
        for _ in range(rounds):
            for document in documents:
                _count(statuses, client.post("/v1/completions", json={"prompt": document, "max_tokens": 8}))
                time.sleep(pause_s)
            burst = [{"prompt": _document(seed), "max_tokens": 64} for seed in range(BURST)]
            for response in pool.map(lambda body: client.post("/v1/completions", json=body), burst):
                _count(statuses, response)
            chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=chat) as response:
                response.read()
                _count(statuses, response)
            _count(statuses, client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}))
            unknown_model = {"model": "no-such-model", "prompt": "x", "max_tokens": 1}
            _count(statuses, client.post("/v1/completions", json=unknown_model))
    return statuses


def _document(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(DOCUMENT_TOKENS)]


def _count(statuses: dict[int, int], response: httpx.Response) -> None:
    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1


def _redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port).ping())
    except redis.RedisError:
        return False


def _healthy(url: str, process: subprocess.Popen, log: Path) -> bool:
    if process.poll() is not None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"longctx serve exited with {process.returncode}; the end of {log}:\n{tail}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout_s} s")
        time.sleep(0.2)


def _stop(process: subprocess.Popen, timeout_s: float = 10) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class LiveStack:
    serve_url: str
    prometheus: PrometheusServer


@contextmanager
def live_stack(workdir: Path) -> Iterator[LiveStack]:
    """A tiny model, Redis, `longctx serve` and a Prometheus scraping its /metrics every second."""
    model_dir = str(workdir / "tiny")
    # the CLI, not model_shards: this package runs beside the driver and imports no torch
    subprocess.run([str(LONGCTX), "make-model", model_dir, "--preset", "tiny"], check=True, capture_output=True)
    port = free_port()
    # Prometheus starts first: its first scrape comes ~5 s after it starts (target discovery sends
    # its updates every 5 s), and that wait now passes while `longctx serve` starts (~13 s).
    prometheus = PrometheusServer(workdir / "prometheus", [f"127.0.0.1:{port}"]).start()
    try:
        with redis_server(workdir) as redis_url, longctx_serve(model_dir, workdir, redis_url, port) as serve_url:
            _wait_for(lambda: prometheus.scraped_samples() > 0, 30, "the first scrape")
            yield LiveStack(serve_url, prometheus)
    finally:
        prometheus.stop()
