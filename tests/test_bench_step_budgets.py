"""bench/step_budgets.py runs on the CPU (--smoke) and writes a row per budget and batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "step_budgets.py"


def test_the_smoke_run_writes_every_budget_and_batch(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "step_budgets.json").read_text())["rows"]
    assert sorted(rows) == ["16", "64"] and all(list(row) == ["4x40"] for row in rows.values())
    assert all(run["ttft_max_s"] >= run["ttft_mean_s"] > 0 for row in rows.values() for run in row["4x40"])
