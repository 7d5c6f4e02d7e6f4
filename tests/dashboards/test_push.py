"""`longctx dashboards push` against a stand-in Grafana: a real HTTP server on a free port that
records what grafana-client sends and answers as Grafana's folder and dashboard APIs do."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.cli import main
from dashboards.catalog import all_dashboards


class StandInGrafana(BaseHTTPRequestHandler):
    """Folder `longctx` missing at first; every dashboard saved; `reject` answers 401 to everything."""

    requests: list[tuple[str, str, dict, dict]] = []
    folders: set[str] = set()
    reject = False

    def do_GET(self):
        self._record(None)
        if self.path.startswith("/api/folders/") and self.path.rsplit("/", 1)[1] in self.folders:
            return self._answer(200, {"uid": self.path.rsplit("/", 1)[1]})
        self._answer(404, {"message": "folder not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._record(body)
        if self.path == "/api/folders":
            self.folders.add(body["uid"])
            return self._answer(200, {"uid": body["uid"], "title": body["title"]})
        uid = body["dashboard"]["uid"]
        self._answer(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x", "version": 1})

    def _record(self, body) -> None:
        self.requests.append((self.command, self.path, dict(self.headers), body))

    def _answer(self, status: int, payload: dict) -> None:
        if self.reject:
            status, payload = 401, {"message": "invalid API key"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def grafana():
    StandInGrafana.requests, StandInGrafana.folders, StandInGrafana.reject = [], set(), False
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_creates_the_folder_and_saves_every_dashboard_with_the_token(grafana, capsys):
    assert main(["dashboards", "push", "--url", grafana, "--token", "glsa_secret"]) == 0
    requests = StandInGrafana.requests
    assert [(method, path) for method, path, _, _ in requests[:2]] == [("GET", "/api/folders/longctx"),
                                                                        ("POST", "/api/folders")]
    assert requests[1][3] == {"title": "longctx", "uid": "longctx"}
    saved = [body for method, path, _, body in requests if path == "/api/dashboards/db"]
    assert [body["dashboard"] for body in saved] == list(all_dashboards().values())
    assert all(body["overwrite"] is True and body["folderUid"] == "longctx" for body in saved)
    assert all(headers["Authorization"] == "Bearer glsa_secret" for _, _, headers, _ in requests)
    assert capsys.readouterr().out.split() == ["/d/longctx-serving/x", "/d/longctx-kv-tiers/x"]


def test_a_second_push_reuses_the_folder(grafana):
    assert main(["dashboards", "push", "--url", grafana, "--token", "t"]) == 0
    assert main(["dashboards", "push", "--url", grafana, "--token", "t"]) == 0
    assert [path for method, path, _, _ in StandInGrafana.requests].count("/api/folders") == 1


def test_a_refused_token_is_a_one_line_error(grafana, capsys):
    StandInGrafana.reject = True
    assert main(["dashboards", "push", "--url", grafana, "--token", "wrong"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("longctx: error: ") and error.count("\n") == 1 and "401" in error


def test_export_from_the_command_line(tmp_path, capsys):
    assert main(["dashboards", "export", str(tmp_path / "out")]) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["longctx-kv-tiers.json", "longctx-serving.json"]
