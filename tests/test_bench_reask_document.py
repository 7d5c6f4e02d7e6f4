"""bench/reask_document.py on the CPU: a small document asked about twice, the second ask a
prefix-cache hit; each row's stages add up to its TTFT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "reask_document.py"


def test_a_small_document_asked_again_hits_the_prefix_cache(tmp_path):
    out = tmp_path / "reask_document.json"
    run = subprocess.run([sys.executable, str(BENCH), "--tokens", "2000", "--block-size", "16", "--device", "cpu",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    first, again, plain = json.loads(out.read_text())["rows"]
    assert [first["ask"], again["ask"], plain["ask"]] == ["first ask", "re-ask", "re-ask, one encode call"]
    assert first["prefix_hit_tokens"] == 0 and 1900 < first["prompt_tokens"] < 2200
    for row in (again, plain):  # the document's full blocks come from the prefix cache
        assert first["prompt_tokens"] - 32 <= row["prefix_hit_tokens"] < row["prompt_tokens"]
        assert abs(row["prepare_s"] + row["engine_s"] - row["ttft_s"]) < 1e-6
    assert "re-ask" in run.stdout
