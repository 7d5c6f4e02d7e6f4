"""bench/request_path.py splits a served request's TTFT into stages that add up to it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "request_path.py"


def test_every_stage_of_each_request_is_timed_and_they_add_up_to_its_ttft(tmp_path):
    out = tmp_path / "request_path.json"
    run = subprocess.run([sys.executable, str(BENCH), "--shared-prefix-len", "512", "--requests", "3", "--warmup", "1",
                          "--engine-loop", "process", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    sys.path.insert(0, str(BENCH.parent))
    from request_path import STAGES

    rows = {row["stage"]: row for row in report["stages"]}
    assert list(rows) == [stage for stage, _ in STAGES] + ["TTFT as the client sees it"]
    assert all(row["requests"] == 3 and row["min_ms"] >= 0 for row in rows.values())
    stages_ms = sum(row["median_ms"] for stage, row in rows.items() if stage != "TTFT as the client sees it")
    ttft_ms = rows["TTFT as the client sees it"]["median_ms"]
    assert 0.5 * ttft_ms < stages_ms < 1.5 * ttft_ms
    assert "3 prefill" in report["engine"]
