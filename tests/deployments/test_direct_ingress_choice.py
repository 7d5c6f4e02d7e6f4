"""When `longctx serve` lets its one replica take the HTTP port itself (cluster/serve.py)."""

import os

import pytest

from cluster.config import LongctxConfig, ModelSettings, ServeSettings
from cluster.serve import _proxy_port


@pytest.fixture
def clean_environment(monkeypatch):
    for name in [name for name in os.environ if name.startswith("RAY_SERVE_DIRECT_INGRESS")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    # _proxy_port writes os.environ directly: restore it after each test
    monkeypatch.setattr(os, "environ", dict(os.environ))


def _config(**serve) -> LongctxConfig:
    return LongctxConfig(model=ModelSettings(path="unused"), serve=ServeSettings(**serve))


def test_an_embedded_one_replica_server_listens_itself_and_moves_the_proxy(clean_environment):
    proxy = _proxy_port(_config(), embedded=True, host="127.0.0.1", port=18123)
    assert proxy not in (18123, 0)
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"],
            os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("18123", "18124")


@pytest.mark.parametrize("embedded, serve", [
    (False, {}),  # a cluster's Ray was started without the environment: its proxy serves
    (True, {"direct_ingress": False}),
    (True, {"num_replicas": 2}),  # several replicas: the proxy routes between them
    (True, {"ingress_in_replica": False}),
])
def test_otherwise_the_proxy_keeps_the_port(clean_environment, embedded, serve):
    assert _proxy_port(_config(**serve), embedded=embedded, host="127.0.0.1", port=18123) == 18123
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ
