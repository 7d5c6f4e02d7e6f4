"""Tenants kept apart: with API keys, each tenant's prompts live in their own cache namespace, and
`cached_tokens` never tells a caller that someone else sent a prefix (issue 17, finding 7).
Through the HTTP API over a real engine in process."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.api import OpenAIService, build_api
from deployments.llm_server import LLMServer
from deployments.local_backend import LocalBackend
from deployments.prompts import PromptBuilder
from deployments.tenants import load_api_keys

KEY_FILE = """
acme     sk-acme-1
acme     sk-acme-2      # a second key of the same tenant
globex   sk-globex
sk-loner                # a key with no tenant name: a namespace of its own
"""
PROMPT = {"prompt": list(range(100, 180)), "max_tokens": 1}  # 80 tokens: five full blocks of 16


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secrets") / "api-keys"
    path.write_text(KEY_FILE)
    return str(path)


def _app(make_config, key_file, **serve_fields):
    server = LLMServer(make_config(executor="local", api_key_file=key_file, **serve_fields))
    service = OpenAIService(LocalBackend(server), PromptBuilder.from_config(server.config), server.config.serve, "tiny")
    return server, TestClient(build_api(service, load_api_keys(server.config.serve)))


@pytest.fixture
def app(make_config, key_file):
    server, client = _app(make_config, key_file)
    yield client
    server.engine.shutdown()


def _cached_tokens(client, key: str, **fields) -> int:
    response = client.post("/v1/completions", json={**PROMPT, **fields}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_each_tenant_has_its_own_cache_namespace(app):
    assert _cached_tokens(app, "sk-acme-1") == 0
    assert _cached_tokens(app, "sk-acme-1") == 64  # its own prefix: four blocks (the last token is computed)
    assert _cached_tokens(app, "sk-acme-2") == 64  # another key of the same tenant
    assert _cached_tokens(app, "sk-globex") == 0  # the same prompt, another tenant: nothing to see
    assert _cached_tokens(app, "sk-loner") == 0
    assert _cached_tokens(app, "sk-globex") == 64


def test_a_client_salt_cannot_reach_into_another_tenant_s_namespace(app):
    assert _cached_tokens(app, "sk-acme-1", cache_salt="shared") == 0
    assert _cached_tokens(app, "sk-globex", cache_salt="shared") == 0
    assert _cached_tokens(app, "sk-globex", cache_salt='["tenant", "acme", "shared"]') == 0


def test_only_listed_keys_get_in(app):
    assert app.post("/v1/completions", json=PROMPT).status_code == 401
    assert app.post("/v1/completions", json=PROMPT, headers={"Authorization": "Bearer acme"}).status_code == 401
    assert app.get("/v1/models", headers={"Authorization": "Bearer sk-loner"}).status_code == 200


def test_shared_namespace_hits_across_tenants_but_reports_no_cached_tokens(make_config, key_file):
    server, client = _app(make_config, key_file, tenants_share_cache=True)
    try:
        assert _cached_tokens(client, "sk-acme-1") == 0
        assert _cached_tokens(client, "sk-globex") == 0  # a hit, on acme's prompt: not told
        text = client.get("/metrics").text
        assert "longctx_prefix_cache_hit_tokens_total 64.0" in text  # the hit happened
    finally:
        server.engine.shutdown()
