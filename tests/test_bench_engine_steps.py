"""bench/engine_steps.py: a workload's share of the engine's step and loop counters, read from the
engine's exposition (direct) or /metrics (served: every replica's series, labelled by replica)."""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_steps import engine_counters, format_step_report, step_report  # noqa: E402
from engine.step_metrics import StepMetrics  # noqa: E402


def _exposition(metrics: StepMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_workload_gets_the_difference_of_the_counters():
    metrics = StepMetrics(CollectorRegistry())
    metrics.observe_step(512, 0, {"schedule": 0.001, "execute": 0.020, "outputs": 0.001})  # before the workload
    before = engine_counters(_exposition(metrics))
    metrics.observe_step(256, 0, {"schedule": 0.0, "execute": 0.010, "outputs": 0.0})
    for _ in range(4):
        metrics.observe_step(0, 8, {"schedule": 0.0, "execute": 0.004, "outputs": 0.001})
    metrics.observe_step(128, 8, {"schedule": 0.0, "execute": 0.008, "outputs": 0.0})
    metrics.observe_loop("step", 0.038)
    metrics.observe_loop("idle", 0.010)
    report = step_report(before, engine_counters(_exposition(metrics)), wall_s=0.050)
    assert report["steps"] == {"prefill": 1, "decode": 4, "mixed": 1}
    assert report["mean_step_ms"] == {"prefill": 10.0, "decode": 5.0, "mixed": 8.0}
    assert report["prompt_tokens"] == 384 and report["output_tokens"] == 40
    assert report["loop_share_of_wall"] == {"step": 0.76, "publish": 0.0, "commands": 0.0, "gather": 0.0, "idle": 0.2}
    assert report["mean_step_phase_ms"]["execute"] == round(0.034 / 6 * 1e3, 3)
    line = format_step_report(report)
    assert "6 steps: 1 prefill (10.00 ms), 4 decode (5.00 ms), 1 mixed (8.00 ms)" in line
    assert "step 76%" in line and "idle 20%" in line and "publish" not in line


def test_replicas_series_are_summed():
    text = """# TYPE longctx_engine_steps counter
longctx_engine_steps_total{kind="decode",replica="a"} 3.0
longctx_engine_steps_total{kind="decode",replica="b"} 4.0
longctx_engine_steps_total{kind="prefill",replica="a"} 1.0
# TYPE longctx_kv_hit_tokens counter
longctx_kv_hit_tokens_total{tier="device",replica="a"} 9.0
"""
    assert engine_counters(text) == {("longctx_engine_steps_total", "decode"): 7.0,
                                     ("longctx_engine_steps_total", "prefill"): 1.0}  # fmt: skip


def test_the_garbage_collections_of_the_workload_are_reported():
    metrics = StepMetrics(CollectorRegistry())
    metrics.observe_gc(2, 0.150)  # before the workload
    before = engine_counters(_exposition(metrics))
    metrics.observe_step(0, 8, {"schedule": 0.0, "execute": 0.004, "outputs": 0.001})
    for _ in range(3):
        metrics.observe_gc(0, 0.0001)
    metrics.observe_gc(2, 0.080)
    report = step_report(before, engine_counters(_exposition(metrics)), wall_s=0.1)
    assert report["gc"]["0"] == {"collections": 3, "pause_ms": 0.3}
    assert report["gc"]["2"] == {"collections": 1, "pause_ms": 80.0}
    assert report["gc"]["1"] == {"collections": 0, "pause_ms": 0.0}
    assert "gc: 4 collections (1 full), 80.3 ms" in format_step_report(report)


def test_slow_steps_are_counted_apart_from_the_mean():
    metrics = StepMetrics(CollectorRegistry())
    metrics.observe_step(128, 8, {"schedule": 0.0, "execute": 0.200, "outputs": 0.0})  # before the workload
    before = engine_counters(_exposition(metrics))
    for execute_s in (0.005, 0.006, 0.050, 0.150):
        metrics.observe_step(128, 8, {"schedule": 0.0, "execute": execute_s, "outputs": 0.0})
    report = step_report(before, engine_counters(_exposition(metrics)), wall_s=0.3)
    assert report["steps_over_ms"] == {"32": 2, "128": 1}
    assert "4 mixed (52.75 ms), over 32 / 128 ms: 2 / 1;" in format_step_report(report)
    quiet = step_report(before, before, wall_s=0.1)
    assert quiet["steps_over_ms"] == {"32": 0, "128": 0} and "over" not in format_step_report(quiet)
