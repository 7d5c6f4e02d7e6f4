"""bench/serve_load.py --arrival-gap-ab: both gaps in one process, alternating, each run on fresh prompts.

Session 11 ran each gap in a process of its own and got 22-29% between runs, more than the effect
sought (docs/benchmarks.md). The A/B runs A B A B ... on one engine; these tests hold it to that
order, to fresh prompts per run (a repeat of earlier prompts would be served from the prefix cache)
and to its figures: per gap the median and min-max over repeats, A's medians against B's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import serve_load  # noqa: E402

GAPS = (0.004, 0.0)
SLO = (1.0, 1.0)


def _args(**overrides) -> argparse.Namespace:
    values = dict(input_len=8, output_len=3, overhead_requests=2, num_prompts=4, request_rate=float("inf"),
                  concurrency=[2, 4], seed=0, shared_prefix_len=5, repeats=3)  # fmt: skip
    return argparse.Namespace(**{**values, **overrides})


def test_round_0_is_the_prompts_the_bench_always_ran():
    args, prefix = _args(), [7] * 5
    makers = serve_load.workload_makers(args, 1000, prefix)
    expected = serve_load.make_workload("load_c4", 8, 8, 3, float("inf"), 4, 1000, args.seed + 4, prefix)
    assert [make(0).name for make in makers] == ["overhead", "load_c2", "load_c4"]
    assert makers[2](0) == expected
    assert makers[2](1).prompts != expected.prompts


def test_ab_order_alternates_the_gaps():
    assert serve_load.ab_order(GAPS, 3) == [0.004, 0.0, 0.004, 0.0, 0.004, 0.0]


def _recording_bench(events: list):
    """A sender and a gap setter that log what they are given: ("gap", gap) and ("request", prompt)."""

    async def set_gap(gap: float) -> None:
        events.append(("gap", gap))

    async def send(prompt: list[int], output_len: int, record: serve_load.RequestRecord) -> None:
        events.append(("request", tuple(prompt)))
        record.token_times = [record.start + 0.01 * (1 + step) for step in range(output_len)]

    return send, set_gap


def _runs_between_gaps(events: list) -> tuple[list, list[float], list[set]]:
    """(the requests before the first gap was set, the gaps in the order set, each run's prompts)."""
    warm_up, gaps, runs = [], [], []
    for kind, value in events:
        if kind == "gap":
            gaps.append(value)
            runs.append(set())
        elif runs:
            runs[-1].add(value)
        else:
            warm_up.append(value)
    return warm_up, gaps, runs


def test_ab_runs_every_workload_alternating_the_gaps_each_run_on_fresh_prompts(capsys):
    args = _args()
    makers = serve_load.workload_makers(args, 1000, [7] * 5)
    ab = serve_load.ArrivalGapAB(GAPS, 3, makers)
    events: list = []
    runs = asyncio.run(serve_load.run_ab(*_recording_bench(events), ab, SLO, "direct"))

    warm_up, gaps, prompts_by_run = _runs_between_gaps(events)
    assert len(warm_up) == 2
    assert gaps == [0.004, 0.0] * 3 * len(makers)  # A B A B A B at each workload in turn
    assert [len(prompts) for prompts in prompts_by_run] == [2] * 6 + [4] * 6 + [8] * 6
    seen = set(warm_up)
    for prompts in prompts_by_run:  # nothing a run sends was sent before it: no prefix-cache repeats
        assert not prompts & seen
        seen |= prompts
    assert list(runs) == ["overhead", "load_c2", "load_c4"]
    assert all([run["arrival_gap_s"] for run in workload_runs] == [0.004, 0.0] * 3 for workload_runs in runs.values())
    assert runs["load_c4"][0]["completed"] == 8 and runs["load_c4"][0]["ttft_ms"]["p50"] == pytest.approx(10, abs=1)
    assert capsys.readouterr().out.count("direct gap_0.004s load_c4: 8 ok") == 3


def _run(gap: float, ttft_p50: float, tpot_mean: float, tok_per_s: float) -> dict:
    return {"arrival_gap_s": gap, "ttft_ms": {"mean": 0.0, "p50": ttft_p50, "p99": 0.0},
            "tpot_ms": {"mean": tpot_mean, "p50": 0.0, "p99": 0.0}, "output_throughput_tok_per_s": tok_per_s}  # fmt: skip


# Alternating as run_ab records them: (TTFT p50, TPOT mean, tok/s) of A then B, three times.
RUNS = [_run(0.004, 30, 2.0, 1000), _run(0.0, 44, 2.1, 800),
        _run(0.004, 10, 2.2, 900), _run(0.0, 40, 2.3, 850),
        _run(0.004, 20, 2.1, 1100), _run(0.0, 50, 1.9, 700)]  # fmt: skip


def test_summarize_ab_gives_per_gap_median_and_range_and_a_against_b():
    ab = serve_load.summarize_ab(RUNS)
    assert set(ab) == {"order", "repeats", "variants", "compared", "median_change_pct", "ranges_overlap", "runs"}
    assert ab["order"] == ["gap_0.004s", "gap_0s"] * 3
    assert ab["repeats"] == {"gap_0.004s": 3, "gap_0s": 3}
    assert ab["compared"] == "gap_0.004s against gap_0s"
    on, off = ab["variants"]["gap_0.004s"], ab["variants"]["gap_0s"]
    assert set(on) == {"ttft_p50_ms", "tpot_mean_ms", "output_tok_per_s"}
    assert on["ttft_p50_ms"] == {"median": 20, "min": 10, "max": 30}
    assert off["ttft_p50_ms"] == {"median": 44, "min": 40, "max": 50}
    assert on["output_tok_per_s"] == {"median": 1000, "min": 900, "max": 1100}
    assert off["tpot_mean_ms"] == {"median": 2.1, "min": 1.9, "max": 2.3}
    assert ab["median_change_pct"] == {"ttft_p50_ms": -54.5, "tpot_mean_ms": 0.0, "output_tok_per_s": 25.0}
    assert ab["ranges_overlap"] == {"ttft_p50_ms": False, "tpot_mean_ms": True, "output_tok_per_s": False}


def test_an_even_number_of_repeats_takes_the_middle_two():
    runs = [_run(0.004, 10, 2.0, 100), _run(0.0, 10, 2.0, 100), _run(0.004, 20, 2.0, 100), _run(0.0, 10, 2.0, 100)]
    assert serve_load.summarize_ab(runs)["variants"]["gap_0.004s"]["ttft_p50_ms"]["median"] == 15


def test_the_ab_report_prints_every_path_and_writes_json(capsys):
    results = {"direct": {"load_c2": RUNS}, "http_fused_direct": {"load_c2": RUNS[::-1]}}
    workload = serve_load.make_workload("load_c2", 4, 8, 3, float("inf"), 2, 1000, 0)
    report = json.loads(json.dumps(serve_load._ab_report(_args(), results, [workload])))
    by_path = report["arrival_gap_ab"]["load_c2"]
    assert list(by_path) == ["direct", "http_fused_direct"]
    assert by_path["http_fused_direct"]["compared"] == "gap_0s against gap_0.004s"  # its first run had gap 0
    out = capsys.readouterr().out
    assert "A/B load_c2: 4 requests" in out and "3 runs of each gap, alternating" in out
    assert "  direct gap_0.004s against gap_0s: ttft_p50_ms -54.5% (ranges apart), tpot_mean_ms +0.0%, " \
           "output_tok_per_s +25.0% (ranges apart)" in out
    assert "20.00 [10.00-30.00]" in out


@pytest.mark.parametrize("flags", [["--arrival-gap-ab", "0.004"], ["--arrival-gap-ab", "0.004,0.004"],
                                   ["--arrival-gap-ab", "-1,0"], ["--arrival-gap-ab", "0.004,0", "--arrival-gap-s", "0"],
                                   ["--arrival-gap-ab", "0.004,0", "--repeats", "0"]])  # fmt: skip
def test_bad_ab_flags_are_refused(monkeypatch, flags):
    monkeypatch.setattr(sys, "argv", ["serve_load.py", *flags])
    with pytest.raises(SystemExit):
        serve_load._parse_args()


def test_ab_flags(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["serve_load.py", "--arrival-gap-ab", "0.004,0", "--repeats", "2"])
    args = serve_load._parse_args()
    assert args.arrival_gap_ab == (0.004, 0.0) and args.repeats == 2
