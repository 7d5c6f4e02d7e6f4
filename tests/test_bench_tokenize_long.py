"""bench/tokenize_long.py times one call against exact chunks on a small text and writes its row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from model_folder.chunked_encoding import CHUNK_CHARS

BENCH = Path(__file__).resolve().parents[1] / "bench" / "tokenize_long.py"


def test_a_small_run_writes_an_exact_chunked_row(tmp_path):
    out = tmp_path / "tokenize_long.json"
    run = subprocess.run([sys.executable, str(BENCH), "--tokens", "60000", "--vocab", "1024",
                          "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    [row] = report["rows"]
    assert row["exact"] and row["chunks"] >= row["chars"] // (2 * CHUNK_CHARS) and 50_000 < row["tokens"] < 70_000
    assert row["plain_s"] > 0 and row["chunked_s"] > 0 and 0 < row["reasked_s"] < row["plain_s"]
    assert report["cores"] >= 1
    assert "speed-up" in run.stdout
