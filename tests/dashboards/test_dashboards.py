"""The dashboards as Grafana stores them: every panel the operators need is there, every query
names a series the code exports, and the copies in the Helm chart are the generated ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dashboards.catalog import all_dashboards, panel_targets
from dashboards.export import export_dashboards
from dashboards.panels import DATASOURCE_VARIABLE
from deployments.metrics import DURATION_BUCKETS, REPLICA_GAUGES, TTFT_BUCKETS

CHART_DASHBOARDS = Path(__file__).parents[2] / "helm" / "longctx" / "dashboards"
SOURCES = [Path(__file__).parents[2] / name
           for name in ("deployments/metrics.py", "kvcache/tier_metrics.py", "engine/step_metrics.py",
                        "engine/gc_pauses.py")]
SERIES = re.compile(r"\b((?:longctx|ray)_[a-z_]+)\b")
# Prometheus adds these to the family names the code declares
SUFFIXES = ("_total", "_bucket", "_count", "_sum")

REQUIRED_PANELS = {
    "longctx-serving": {"Requests by status", "Error ratio", "Time to first token", "Time per output token",
                        "End-to-end latency", "Queued context tokens and replicas", "Engine steps by kind",
                        "Engine loop time", "GPU memory"},
    "longctx-kv-tiers": {"KV blocks per tier", "KV bytes per tier", "Hit rate per tier", "Spill and restore bandwidth",
                         "Restore or recompute", "Redis up", "Redis fetches and writes", "Redis errors"},
}


def _declared_families() -> set[str]:
    text = "".join(path.read_text() for path in SOURCES)
    families = set(re.findall(r'"(longctx_[a-z_]+)"', text))
    return families | {name for name, _ in REPLICA_GAUGES.values()}


def test_each_dashboard_has_the_panels_operators_need():
    dashboards = all_dashboards()
    assert set(dashboards) == set(REQUIRED_PANELS)
    for uid, model in dashboards.items():
        titles = {panel["title"] for panel in model["panels"]}
        assert REQUIRED_PANELS[uid] <= titles
        ids = [panel["id"] for panel in model["panels"]]
        assert len(set(ids)) == len(ids)


def test_every_query_reads_a_series_the_code_exports():
    declared = _declared_families()
    for model in all_dashboards().values():
        for title, expr in panel_targets(model):
            for series in SERIES.findall(expr):
                if series.startswith("ray_"):
                    assert series in {"ray_node_gram_used", "ray_node_gram_available"}, (title, series)
                    continue
                family = next((series.removesuffix(s) for s in SUFFIXES if series.endswith(s)), series)
                assert family in declared or series in declared, (title, series)


def test_every_panel_reads_the_chosen_prometheus():
    for model in all_dashboards().values():
        variables = [variable["name"] for variable in model["templating"]["list"]]
        assert variables == [DATASOURCE_VARIABLE]
        for panel in model["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_latency_buckets_reach_hours():
    assert TTFT_BUCKETS[-1] >= 3600 and DURATION_BUCKETS[-1] >= 3600  # 1M-token prefills queued behind others


def test_export_writes_the_json_the_chart_ships(tmp_path):
    written = export_dashboards(tmp_path)
    assert sorted(path.name for path in written) == ["longctx-kv-tiers.json", "longctx-serving.json"]
    for path in written:
        assert json.loads(path.read_text())["uid"] == path.stem
        # helm/longctx/dashboards/ must be regenerated with `longctx dashboards export` after a change
        assert (CHART_DASHBOARDS / path.name).read_text() == path.read_text(), path.name
