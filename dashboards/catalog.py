"""Every dashboard longctx ships, by uid, and the JSON Grafana stores for each."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from dashboards import kv_tiers, serving

DASHBOARDS: dict[str, Callable[[], Any]] = {
    serving.UID: serving.serving_dashboard,
    kv_tiers.UID: kv_tiers.kv_tiers_dashboard,
}


def dashboard_json(uid: str) -> dict[str, Any]:
    """The dashboard model as Grafana's JSON (what its API and the sidecar take), panel ids numbered."""
    model = json.loads(json.dumps(DASHBOARDS[uid]().build(), cls=JSONEncoder))
    for panel_id, panel in enumerate(model["panels"], start=1):
        panel["id"] = panel_id
    return model


def all_dashboards() -> dict[str, dict[str, Any]]:
    return {uid: dashboard_json(uid) for uid in DASHBOARDS}


def panel_targets(model: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel, rows skipped."""
    for panel in model["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
