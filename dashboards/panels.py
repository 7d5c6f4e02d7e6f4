"""Panel builders shared by the dashboards: one Prometheus data source, PromQL targets that name
their origin, and the few panel shapes the dashboards use (time series and stat)."""

from __future__ import annotations

from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_model

DATASOURCE_VARIABLE = "datasource"
DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VARIABLE}}}")
# Grafana's window for rate(): at least four scrape intervals, so that a rate always has samples.
RATE_INTERVAL = "$__rate_interval"
PERCENTILES = (0.5, 0.9, 0.99)
FULL_WIDTH = 24


@dataclass(frozen=True)
class Query:
    """One PromQL target and its legend. Series named `longctx_*` come from this repository's
    /metrics; `ray_*` ones from Ray's node metrics (GPU memory), scraped from the Ray pods."""

    expr: str
    legend: str


def rate(series: str, by: str = "", selector: str = "") -> str:
    """sum [by (labels)] (rate(series{selector}[$__rate_interval]))"""
    grouping = f" by ({by})" if by else ""
    matchers = f"{{{selector}}}" if selector else ""
    return f"sum{grouping} (rate({series}{matchers}[{RATE_INTERVAL}]))"


def percentile_queries(histogram: str) -> list[Query]:
    """p50 / p90 / p99 of a Prometheus histogram over all replicas."""
    buckets = rate(f"{histogram}_bucket", by="le")
    return [Query(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)}") for q in PERCENTILES]


def timeseries_panel(title: str, description: str, unit: str, queries: list[Query], width: int = 12):
    panel = (
        timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .height(8).span(width).fill_opacity(10).line_width(1)
        .legend(common_builders.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM))
    )
    return _with_targets(panel, queries)


def stat_panel(title: str, description: str, unit: str, queries: list[Query], width: int = 6):
    panel = stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE).height(8).span(width)
    return _with_targets(panel, queries)


def _with_targets(panel, queries: list[Query]):
    for index, query in enumerate(queries):
        target = prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(chr(ord("A") + index))
        panel = panel.with_target(target)
    return panel


def new_dashboard(uid: str, title: str, description: str, rows: list[tuple[str, list]]) -> dashboard.Dashboard:
    """A dashboard of (row title, panels) rows, with the Prometheus data-source variable every
    panel reads through."""
    board = (
        dashboard.Dashboard(title).uid(uid).description(description).tags(["longctx"]).refresh("30s")
        .time("now-1h", "now").timezone("browser")
        .with_variable(dashboard.DatasourceVariable(DATASOURCE_VARIABLE).label("Prometheus").type("prometheus"))
    )
    for row_title, panels in rows:
        board = board.with_row(dashboard.Row(row_title))
        for panel in panels:
            board = board.with_panel(panel)
    return board
