"""Replicas and queued prefill tokens over time, one column per run (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from autoscaler.simulator.simulation import SimulationRun


def plot_runs(runs: Sequence[tuple[str, SimulationRun]], path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'longctx[plot]'") from None
    figure, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 6), sharex=True, squeeze=False)
    for column, (label, run) in enumerate(runs):
        _draw(axes[0][column], axes[1][column], label, run)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw(replicas_axis, tokens_axis, label: str, run: SimulationRun) -> None:
    minutes = [point.time_s / 60 for point in run.timeline]
    replicas_axis.step(minutes, [p.target_replicas for p in run.timeline], where="post", label="asked for")
    replicas_axis.step(minutes, [p.serving_replicas for p in run.timeline], where="post", label="serving")
    replicas_axis.set_title(label)
    replicas_axis.set_ylabel("replicas")
    replicas_axis.legend(loc="upper right")
    tokens_axis.step(minutes, [p.queued_prefill_tokens / 1e6 for p in run.timeline], where="post", color="tab:red")
    tokens_axis.set_ylabel("queued prefill (M tokens)")
    tokens_axis.set_xlabel("minutes")
