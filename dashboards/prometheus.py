"""A private Prometheus (Debian's `prometheus` binary) scraping given targets, and its HTTP API.

Used by the dashboard tests and by pictures.py: every panel query is evaluated by Prometheus
itself, so a query that does not parse, or names a series nobody exports, shows up here.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from dashboards.panels import RATE_INTERVAL

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """Scrapes `targets` (host:port, path /metrics) every `scrape_interval_s`; stores in `workdir`."""

    def __init__(self, workdir: Path, targets: list[str], scrape_interval_s: float = 1.0):
        if PROMETHEUS is None:
            raise FileNotFoundError("prometheus is not installed (make setup installs Debian's package)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.targets = targets
        self.scrape_interval_s = scrape_interval_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        config = self.workdir / "prometheus.yml"
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "longctx", "static_configs": [{"targets": self.targets}]}],
        }))
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=(self.workdir / "prometheus.log").open("w"))
        self._wait_ready(timeout_s)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}; see {self.workdir}/prometheus.log")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready within {timeout_s} s")

    def scraped_samples(self) -> float:
        """Samples of the last scrape of every target (0 until one succeeded)."""
        result = self.query("sum(scrape_samples_scraped)")
        return float(result[0]["value"][1]) if result else 0.0

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self._get("query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        return self._get("query_range", {"query": expr, "start": start, "end": end, "step": step_s})["result"]

    def _get(self, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=30).json()
        if reply["status"] != "success":
            raise ValueError(f"prometheus rejected {params['query']!r}: {reply.get('error')}")
        return reply["data"]


def concrete(expr: str, rate_interval: str) -> str:
    """The query as Grafana sends it, with `$__rate_interval` replaced by a fixed window."""
    return expr.replace(RATE_INTERVAL, rate_interval)
