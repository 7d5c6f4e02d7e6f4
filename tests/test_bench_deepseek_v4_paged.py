"""bench/deepseek_v4_paged.py runs on the CPU as the GPU stages call it (bench/gpu_open_figures.sh):
session 12 lost a device call to a config field the bench still passed after it was removed.
Tiny preset, one short prompt, two requests decoding together, both kernel choices given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "deepseek_v4_paged.py"


@pytest.mark.parametrize("choices", [["--chunk-attention", "blocks", "--index-top-k", "ranked"], []])
def test_the_bench_runs_and_writes_its_rows(tmp_path, choices):
    command = [sys.executable, str(BENCH), "--lengths", "100", "--chunk-tokens", "64", "--decode-steps", "2",
               "--model-max-length", "0", "--concurrency", "2", "--concurrency-prompt-tokens", "40", *choices]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "deepseek_v4_paged.json").read_text())
    text = json.dumps(report)
    assert '"length": 100' in text and '"concurrency": 2' in text
    assert report["kv"]["flash_43_layers_pages_bytes_per_token"] == 6584.0
