"""bench/step_anatomy.py runs on the CPU (--smoke): a row per step kind whose phases add up to the
step, and a profile of the steps it names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "step_anatomy.py"


def test_the_smoke_run_times_every_step_kind_and_profiles_four(tmp_path):
    out = tmp_path / "anatomy.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    expected = ["first mixed step", "decode x4", "prefill 1", "prefill 2", "decode x4 + prefill 1",
                "decode x4 + prefill 2"]  # fmt: skip
    assert list(report["steps_ms"]) == expected
    for name, row in report["steps_ms"].items():
        phases = row["schedule"] + row["execute"] + row["outputs"]
        # medians of different steps: the phases of one step lie inside it, their medians about so
        assert row["ms"] > 0 and phases <= row["ms"] * 1.25 + 0.1, (name, row)
    assert list(report["profiles"]) == ["decode x4", "prefill 1", "decode x4 + prefill 1", "decode x4 + prefill 2"]
    assert all(profile["python_ms"] and profile["top_host_ops_ms"] for profile in report["profiles"].values())


def test_the_whole_eager_ab_adds_each_mixed_step_run_wholly_eager(tmp_path):
    out = tmp_path / "anatomy.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--whole-eager-ab", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(json.loads(out.read_text())["steps_ms"])
    assert rows[-4:] == ["decode x4 + prefill 1", "decode x4 + prefill 1, eager", "decode x4 + prefill 2",
                         "decode x4 + prefill 2, eager"]  # fmt: skip


def test_the_unfused_ab_adds_each_prefill_and_mixed_step_with_torch_s_elementwise_ops(tmp_path):
    out = tmp_path / "anatomy.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--unfused-ab", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(json.loads(out.read_text())["steps_ms"]) == [
        "first mixed step", "decode x4", "prefill 1", "prefill 1, unfused", "prefill 2", "prefill 2, unfused",
        "decode x4 + prefill 1", "decode x4 + prefill 1, unfused", "decode x4 + prefill 2",
        "decode x4 + prefill 2, unfused"]  # fmt: skip


def test_device_busy_time_is_the_union_of_the_kernels_intervals():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(BENCH.parents[1]))
    from bench.step_anatomy import busy_us

    def event(start, end, device_type=DeviceType.CUDA):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device_type)

    # two overlapping kernels (10-30, 20-40), one inside another (50-60 in 45-70), a host op ignored
    events = [event(10, 30), event(20, 40), event(45, 70), event(50, 60), event(0, 100, DeviceType.CPU)]
    assert busy_us(events) == 30 + 25
