"""The HTTP layer alone (FastAPI's TestClient, a scripted backend): health before and after the
model loads, 429 with Retry-After, auth, errors in OpenAI's shape, errors in the middle of a stream."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import ConfigError
from deployments.api import OpenAIService, build_api
from deployments.tenants import load_api_keys
from deployments.messages import engine_failure, overloaded
from deployments.prompts import PromptBuilder
from engine.outputs import CompletionDelta
from kvcache.tier_metrics import TierMetrics

MODEL = "tiny"


def _delta(text: str, finished: bool = False) -> CompletionDelta:
    return CompletionDelta("r", 0, text, (7,), (), finished, "length" if finished else None, 3, 1, 0)


class ScriptedBackend:
    """Replies with a fixed script; reports whatever replica stats the test sets."""

    def __init__(self, script):
        self.script = script
        self.stats: list[dict] = []
        self.requests = []

    async def generate(self, request):
        self.requests.append(request)
        for item in self.script:
            yield item

    async def replica_stats(self, timeout_s):
        return self.stats

    async def replica_metrics(self, timeout_s):
        return self.stats


@pytest.fixture(scope="module")
def prompts(make_config):
    return PromptBuilder.from_config(make_config())


def _client(make_config, prompts, script, api_key=None, **serve_fields):
    config = make_config(**serve_fields)
    backend = ScriptedBackend(script)
    service = OpenAIService(backend, prompts, config.serve, MODEL)
    return TestClient(build_api(service, {api_key: "tenant"} if api_key else None)), backend


def _assert_openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert error["code"] == code


def test_health_is_503_until_a_replica_has_loaded_its_model(make_config, prompts):
    client, backend = _client(make_config, prompts, [])
    assert client.get("/health").status_code == 503
    backend.stats = [{"replica": "a", "alive": False}]
    assert client.get("/health").status_code == 503
    backend.stats = [{"replica": "a", "alive": True}]
    assert client.get("/health").status_code == 200


def test_a_full_queue_is_429_with_retry_after(make_config, prompts):
    client, _ = _client(make_config, prompts, [overloaded("queue full", 7)])
    response = client.post("/v1/completions", json={"prompt": "hi"})
    _assert_openai_error(response, 429, code="server_overloaded")
    assert response.headers["retry-after"] == "7"
    streamed = client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    _assert_openai_error(streamed, 429, code="server_overloaded")


def test_an_engine_failure_is_500_before_the_stream_and_an_error_event_during_it(make_config, prompts):
    client, _ = _client(make_config, prompts, [engine_failure("boom")])
    _assert_openai_error(client.post("/v1/completions", json={"prompt": "hi"}), 500, code="engine_error")
    client, _ = _client(make_config, prompts, [[_delta("a")], engine_failure("boom")])
    response = client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    assert json.loads(events[1])["error"]["code"] == "engine_error"
    assert events[-1] == "[DONE]"


def test_api_key_guards_v1_but_not_the_probes(make_config, prompts):
    client, backend = _client(make_config, prompts, [[_delta("x", finished=True)]], api_key="s3cret")
    backend.stats = [{"replica": "a", "alive": True}]
    _assert_openai_error(client.get("/v1/models"), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer nope"}
    _assert_openai_error(client.post("/v1/completions", json={"prompt": "hi"}, headers=wrong), 401, code="invalid_api_key")
    right = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/completions", json={"prompt": "hi"}, headers=right).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_api_keys_from_a_secret_file_name_their_tenants(make_config, tmp_path):
    secret = tmp_path / "keys"
    secret.write_text("from-file\n# a comment\nacme  sk-1\nacme sk-2  # rotated\n\n")
    keys = load_api_keys(make_config(api_key_file=str(secret)).serve)
    assert keys["sk-1"] == keys["sk-2"] == "acme" and keys["from-file"].startswith("key-")
    assert "from-file" not in keys["from-file"]  # a key's own tenant name does not reveal it
    assert set(load_api_keys(make_config(api_key="inline").serve)) == {"inline"}
    assert load_api_keys(make_config().serve) is None
    with pytest.raises(ConfigError, match="api_key_file"):
        load_api_keys(make_config(api_key_file=str(tmp_path / "missing")).serve)
    secret.write_text("a b c\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_api_keys(make_config(api_key_file=str(secret)).serve)


def test_request_fields_reach_the_backend(make_config, prompts):
    client, backend = _client(make_config, prompts, [[_delta("x", finished=True)]])
    body = {"messages": [{"role": "user", "content": "hi"}], "stop": "x", "top_k": 5, "cache_salt": "tenant-a",
            "max_completion_tokens": 9, "seed": 3}  # fmt: skip
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    request = backend.requests[0]
    assert request.params.stop == ("x",) and request.params.top_k == 5 and request.params.max_tokens == 9
    assert request.params.seed == 3 and request.cache_salt == "tenant-a" and not request.fill_max_tokens
    assert request.prompt_token_ids == prompts.chat([{"role": "user", "content": "hi"}])


def test_chat_without_a_limit_leaves_max_tokens_to_the_replica(make_config, prompts):
    client, backend = _client(make_config, prompts, [[_delta("x", finished=True)]])
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert backend.requests[0].fill_max_tokens


def test_body_over_the_limit_is_413(make_config, prompts):
    client, _ = _client(make_config, prompts, [], max_request_body_bytes=2048)
    _assert_openai_error(client.post("/v1/completions", json={"prompt": "x" * 4096}), 413, code="request_too_large")


def test_unknown_routes_and_methods_answer_in_openai_shape(make_config, prompts):
    client, _ = _client(make_config, prompts, [])
    _assert_openai_error(client.get("/v1/nothing"), 404)
    _assert_openai_error(client.get("/v1/completions"), 405)


def test_a_long_prompt_is_tokenized_off_the_event_loop_and_still_checked(make_config, prompts):
    client, _ = _client(make_config, prompts, [])
    response = client.post("/v1/completions", json={"prompt": "word " * 20_000})  # > LONG_PROMPT_CHARS
    _assert_openai_error(response, 400, "prompt", "context_length_exceeded")
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 20_000}]})
    _assert_openai_error(chat, 400, "messages", "context_length_exceeded")


def test_metrics_count_requests_by_status_including_refusals(make_config, prompts):
    client, _ = _client(make_config, prompts, [[_delta("a"), _delta("b", finished=True)]])
    assert client.post("/v1/completions", json={"prompt": "hi", "stream": True}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "hi", "temperature": -1}).status_code == 400
    assert client.post("/v1/completions", json={"prompt": "word " * 5000}).status_code == 400
    text = client.get("/metrics").text
    assert 'longctx_requests_total{endpoint="completions",status="200"} 1.0' in text
    assert 'longctx_requests_total{endpoint="completions",status="400"} 2.0' in text
    assert "longctx_generation_tokens_total 2.0" in text
    assert "longctx_time_to_first_token_seconds_count 1.0" in text
    assert "longctx_inter_token_latency_seconds_count 1.0" in text


def _tier_exposition(host_hit_tokens: int) -> str:
    tiers = TierMetrics()
    tiers.record_lookup("host", host_hit_tokens, 16)
    tiers.track_tier("device", lambda: 3, 4096)
    return generate_latest(tiers.registry).decode()


def test_metrics_re_export_every_replica_s_own_series_labelled_by_replica(make_config, prompts):
    client, backend = _client(make_config, prompts, [])
    backend.stats = [
        {"replica": "a", "alive": True, "exposition": _tier_exposition(32)},
        {"replica": "b", "alive": True, "exposition": _tier_exposition(64)},
        {"replica": "c", "alive": True, "exposition": "not { prometheus"},  # costs c's series only
    ]
    text = client.get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    hits = {(s.labels["replica"], s.labels["tier"]): s.value for s in families["longctx_kv_hit_tokens"].samples}
    assert hits == {("a", "host"): 32, ("b", "host"): 64}
    assert text.count("# TYPE longctx_kv_hit_tokens_total counter") == 1
    assert text.count("# HELP longctx_kv_tier_bytes ") == 1
    assert 'longctx_kv_tier_bytes{replica="b",tier="device"} 12288.0' in text
    assert "longctx_requests_running" in families  # the ingress's own series are still there
