"""bench/overlap_cpu.py runs on the CPU machine and writes both rank placements, off and on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "overlap_cpu.py"


def test_a_small_run_writes_each_placement_off_then_on(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--requests", "4", "--output-len", "3", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "overlap_cpu.json").read_text())["rows"]
    assert [(row["rank"], row["overlap_outputs"]) for row in rows] == [
        ("child process", "off"), ("child process", "on"), ("in process", "off"), ("in process", "on")]
    assert all(row["tok_per_s best"] > 0 and row["execute"] > 0 for row in rows)
    assert rows[0]["vs off"] == rows[2]["vs off"] == "+0.0%"
