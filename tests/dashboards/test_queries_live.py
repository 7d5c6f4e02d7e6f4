"""Every panel query evaluated by a real Prometheus (Debian's package, started here on a free
port) that scrapes a running `longctx serve` on the tiny model after traffic through all three
KV tiers: each query parses, and each one over longctx's series returns data."""

from __future__ import annotations

import re
import time

import pytest

from dashboards import live
from dashboards.catalog import all_dashboards, panel_targets
from dashboards.pictures import draw_all
from dashboards.prometheus import PROMETHEUS, concrete

pytestmark = pytest.mark.slow
WINDOW = "1m"  # every request of the traffic falls inside it
OTHER_EXPORTERS = re.compile(r"\bray_")  # Ray's GPU node metrics: absent on a CPU-only machine


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if PROMETHEUS is None or live.REDIS_SERVER is None:
        pytest.skip("needs prometheus and redis-server (make setup installs both)")
    workdir = tmp_path_factory.mktemp("live")
    with live.live_stack(workdir) as running:
        start = time.time()
        statuses = live.send_traffic(running.serve_url, rounds=2, pause_s=0.2)
        _wait_for_two_scrapes_after(running.prometheus, time.time())
        yield running, statuses, start


def _wait_for_two_scrapes_after(prometheus, moment: float, timeout_s: float = 30) -> None:
    """Until two scrapes began after `moment` (the last request): a fixed sleep waited longer than
    that on an idle machine and could wait less on a busy one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = prometheus.query("max(timestamp(up))")
        if latest and float(latest[0]["value"][1]) > moment + prometheus.scrape_interval_s:
            return
        time.sleep(0.2)
    raise TimeoutError(f"prometheus did not scrape twice within {timeout_s} s")


def _value(prometheus, expr: str) -> float:
    result = prometheus.query(concrete(expr, WINDOW))
    assert result, expr
    return float(result[0]["value"][1])


def test_every_panel_query_parses_and_returns_data(stack):
    running, _, _ = stack
    empty = []
    for uid, model in all_dashboards().items():
        for title, expr in panel_targets(model):
            result = running.prometheus.query(concrete(expr, WINDOW))  # raises unless it parses
            if not result and not OTHER_EXPORTERS.search(expr):
                empty.append(f"{uid} / {title}: {expr}")
    assert not empty, "\n".join(empty)


def test_the_traffic_shows_in_the_panels(stack):
    running, statuses, _ = stack
    prometheus = running.prometheus
    assert statuses[400] == 2 and statuses[404] == 2
    by_status = {s["metric"]["status"] for s in prometheus.query('longctx_requests_total')}
    assert {"200", "400", "404"} <= by_status
    assert _value(prometheus, 'sum(increase(longctx_kv_restore_decisions_total{tier="redis", decision="restore"}'
                              f'[{WINDOW}]))') > 0
    assert _value(prometheus, f'sum(increase(longctx_kv_transfer_bytes_total{{path="redis_to_host"}}[{WINDOW}]))') > 0
    assert _value(prometheus, f'sum(increase(longctx_kv_hit_tokens_total{{tier="redis"}}[{WINDOW}]))') > 0
    assert _value(prometheus, "min(longctx_kv_redis_up)") == 1
    assert _value(prometheus, "count(longctx_kv_blocks_capacity)") == 1  # one replica
    p99 = f"histogram_quantile(0.99, sum by (le) (rate(longctx_time_to_first_token_seconds_bucket[{WINDOW}])))"
    assert 0 < _value(prometheus, p99) < 60


def test_the_docs_pictures_draw_from_the_same_data(stack, tmp_path):
    running, _, start = stack
    paths = draw_all(running.prometheus, start - 2, time.time(), tmp_path)
    assert [path.name for path in paths] == ["longctx-serving.png", "longctx-kv-tiers.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 20_000 for path in paths)
