"""bench/deepseek_v4_sequence_parallel.py end to end on the CPU: the tiny preset, SP=1 in this
process then SP=2 on two spawned gloo ranks, prompts whose chunks split into pieces (64-token
chunks, split from 8 tokens a rank). The JSON holds both SP sizes at every length, and SP=2's
greedy tokens equal SP=1's (float32: logprobs within 1e-4). Its timings are not checked: they
mean nothing on a CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import deepseek_v4_sequence_parallel as bench  # noqa: E402

# The bench sets torch's threads (one an SP rank's share of the cores): restored after the module.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = [70, 150]  # 150: chunks of 64, 64 and 22, each split over the 2 ranks
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("sp-bench") / "result.json"
    returned = bench.main(["--preset", "deepseek-v4-tiny", "--device", "cpu", "--lengths", *map(str, LENGTHS),
                           "--chunk-tokens", "64", "--split-min-tokens", "8", "--sp", "2",
                           "--decode-steps", str(DECODE_STEPS), "--out", str(out)])
    return returned, json.loads(out.read_text())


def test_json_holds_both_sp_sizes_at_every_length(report):
    returned, written = report
    assert written["comparison"] == returned["comparison"]
    for sp in ("sp1", "sp2"):
        assert [row["length"] for row in written[sp]["rows"]] == LENGTHS
        for row in written[sp]["rows"]:
            assert "skipped" not in row
            assert row["ttft_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["tpot_ms"] > 0
            assert len(row["decoded"]) == DECODE_STEPS + 1
            assert row["decode_prefix_hit_tokens"] > 0  # the decode run reuses the TTFT run's blocks
    assert written["sp2"]["split_min_tokens"] == 8 and written["sp2"]["dtype"] == "float32"
    assert written["environment"]["torch"] and written["environment"]["gpus"] == []


def test_sp2_tokens_equal_sp1(report):
    comparison = report[1]["comparison"]
    assert comparison["passed"] and comparison["tolerance"] == 1e-4
    assert [row["length"] for row in comparison["lengths"]] == LENGTHS
    for row in comparison["lengths"]:
        assert row["first_token_equal"] and row["verdict"] == "pass"
        assert row["decode_tokens_equal"] == row["decode_tokens"] == DECODE_STEPS + 1
        assert row["first_logprob_abs_diff"] <= 1e-4 and row["decode_max_logprob_abs_diff"] <= 1e-4
        assert row["ttft_speedup"] > 0


def test_a_different_token_passes_only_as_a_near_tie():
    assert bench.verdict(True, 0.05, 1.0, 0.1) == "pass"
    assert bench.verdict(True, 0.2, 1.0, 0.1) == "FAIL"
    assert bench.verdict(False, 0.01, 0.02, 0.1) == "near tie"
    assert bench.verdict(False, 0.01, 0.5, 0.1) == "FAIL"
