"""`longctx dashboards export DIR` and `longctx dashboards push --url URL --token TOKEN`.

Export writes one `<uid>.json` per dashboard (the Helm chart's copies are these files). Push
creates the folder if it is missing and saves each dashboard through Grafana's HTTP API with
grafana-client, overwriting the previous version of the same uid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dashboards.catalog import all_dashboards

FOLDER_UID = "longctx"
NOT_FOUND = 404


def export_dashboards(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for uid, model in all_dashboards().items():
        path = directory / f"{uid}.json"
        path.write_text(json.dumps(model, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def push_dashboards(url: str, token: str | None, folder: str = "longctx", timeout_s: float = 30.0) -> list[str]:
    """Save every dashboard in `folder` of the Grafana at `url`; returns the URLs Grafana gives them."""
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    _ensure_folder(api, folder)
    saved = []
    for model in all_dashboards().values():
        reply: dict[str, Any] = api.dashboard.update_dashboard(
            {"dashboard": model, "folderUid": FOLDER_UID, "overwrite": True, "message": "longctx dashboards push"})
        saved.append(reply.get("url", model["uid"]))
    return saved


def _ensure_folder(api, title: str) -> None:
    from grafana_client.client import GrafanaClientError

    try:
        api.folder.get_folder(FOLDER_UID)
    except GrafanaClientError as error:
        if error.status_code != NOT_FOUND:
            raise
        api.folder.create_folder(title, uid=FOLDER_UID)
