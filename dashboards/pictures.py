"""Pictures of the dashboards for docs/, drawn with matplotlib from a Prometheus's data: each
panel's queries over a time range, laid out in the dashboard's order (rows become titles).

    python -m dashboards.pictures docs/dashboards     # a live tiny longctx, traffic, then the PNGs
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from dashboards.catalog import all_dashboards
from dashboards.prometheus import PrometheusServer, concrete

COLUMNS = 3
RATE_WINDOW = "15s"
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def draw_dashboard(model: dict[str, Any], prometheus: PrometheusServer, start: float, end: float, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [panel for panel in model["panels"] if panel["type"] != "row"]
    rows = math.ceil(len(panels) / COLUMNS)
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(5 * COLUMNS, 2.6 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        _draw_panel(axis, panel, prometheus, start, end)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(model["title"], fontsize=13)
    figure.tight_layout()
    figure.savefig(out, dpi=60)
    plt.close(figure)
    return out


def _draw_panel(axis, panel: dict[str, Any], prometheus: PrometheusServer, start: float, end: float) -> None:
    step = max(1.0, (end - start) / 200)
    right = _right_axis_targets(panel)
    axes = {False: axis, True: axis.twinx() if right else None}
    lines = []
    for target in panel["targets"]:
        for series in prometheus.query_range(concrete(target["expr"], RATE_WINDOW), start, end, step):
            times = [float(t) - start for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            label = _legend(target.get("legendFormat", ""), series["metric"])
            lines += axes[target["refId"] in right].plot(times, values, linewidth=1, color=f"C{len(lines)}",
                                                         label=label)
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    axis.set_title(panel["title"] + (f"  [{unit}]" if unit else ""), fontsize=9)
    for side in filter(None, axes.values()):
        side.tick_params(labelsize=7)
    if axes[True] is not None:  # counts (replicas): from zero, with headroom
        axes[True].set_ylim(0, math.ceil(axes[True].get_ylim()[1]) + 1)
    axis.set_xlabel("seconds", fontsize=7)
    if lines:
        axis.legend(lines, [line.get_label() for line in lines], fontsize=6, loc="upper left")
    else:
        axis.text(0.5, 0.5, "no data here (GPU nodes only)", ha="center", va="center", fontsize=8,
                  transform=axis.transAxes)


def _right_axis_targets(panel: dict[str, Any]) -> set[str]:
    """refIds that a Grafana override puts on the right axis."""
    placed = set()
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        if override["matcher"]["id"] == "byFrameRefID" and {"id": "custom.axisPlacement", "value": "right"} in \
                override["properties"]:
            placed.add(override["matcher"]["options"])
    return placed


def _legend(template: str, labels: dict[str, str]) -> str:
    return LEGEND_LABEL.sub(lambda match: labels.get(match.group(1), ""), template).strip() or "value"


def draw_all(prometheus: PrometheusServer, start: float, end: float, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [draw_dashboard(model, prometheus, start, end, directory / f"{uid}.png")
            for uid, model in all_dashboards().items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--rounds", type=int, default=6, help="passes over the documents (default 6)")
    args = parser.parse_args()
    from dashboards.live import live_stack, send_traffic

    with tempfile.TemporaryDirectory() as workdir, live_stack(Path(workdir)) as stack:
        start = time.time()
        print("status codes:", send_traffic(stack.serve_url, rounds=args.rounds))
        time.sleep(5)  # a few more scrapes after the last request
        for path in draw_all(stack.prometheus, start - 5, time.time(), args.directory):
            print(path)


if __name__ == "__main__":
    main()
