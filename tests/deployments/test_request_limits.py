"""Every request field within what the served model can hold, checked at the ingress, through
the HTTP API over a real engine in process (issue 17, findings 1, 2, 5 and 6)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from deployments.api import OpenAIService, build_api
from deployments.llm_server import LLMServer
from deployments.local_backend import LocalBackend
from deployments.prompts import PromptBuilder

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
FINDING_1 = [  # each of these used to crash the engine's step for every stream in flight
    {"prompt": "x", "max_tokens": 2, "temperature": 1, "seed": 18446744073709551616},
    {"prompt": "x", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [1000000000]},
    {"prompt": "x", "max_tokens": 4, "temperature": 1, "top_p": 0.5, "top_k": 100000000000000000000},
]


@pytest.fixture(scope="module")
def server(make_config):
    server = LLMServer(make_config(executor="local", max_n=4, default_chat_max_tokens=7,
                                   max_request_body_bytes=64 * 1024))
    yield server
    server.engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    prompts = PromptBuilder.from_config(server.config)
    service = OpenAIService(LocalBackend(server), prompts, server.config.serve, "tiny")
    return TestClient(build_api(service))


def _assert_400(response, param):
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("body, param", zip(FINDING_1, ["seed", "stop_token_ids", "top_k"]))
def test_the_requests_that_crashed_the_engine_are_400s(client, server, body, param):
    _assert_400(client.post("/v1/completions", json=body), param)
    _assert_400(client.post("/v1/chat/completions", json={**CHAT, **{k: v for k, v in body.items() if k != "prompt"}}),
                param)
    assert server.engine.is_alive
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "n": 1000000000}, "n"),  # froze the ingress building a billion choices
    ({"prompt": "hi", "n": 5}, "n"),  # serve.max_n is 4 here
    ({"prompt": "hi", "n": 2, "best_of": 5}, "best_of"),
    ({"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),  # far beyond the 4,096-token context
    ({"prompt": "hi", "max_tokens": "10"}, "max_tokens"),  # strict types: no silent coercion
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "hi", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": "hi", "stop": ["a"] * 100}, "stop"),
])
def test_fields_beyond_their_bounds_or_of_the_wrong_type_are_400s(client, body, param):
    _assert_400(client.post("/v1/completions", json=body), param)


def test_chat_bounds_name_the_field_the_client_sent(client):
    _assert_400(client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 10**6}),
                "max_completion_tokens")
    _assert_400(client.post("/v1/chat/completions", json={**CHAT, "n": 10**9}), "n")
    _assert_400(client.post("/v1/chat/completions", json={**CHAT, "logprobs": "true"}), "logprobs")


def test_a_lone_surrogate_is_a_400_on_both_endpoints(client):
    raw = {"content-type": "application/json"}
    _assert_400(client.post("/v1/completions", content=b'{"prompt": "\\udfff"}', headers=raw), "prompt")
    chat = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    _assert_400(client.post("/v1/chat/completions", content=chat, headers=raw), "messages")
    _assert_400(client.post("/v1/completions", content=b'{"prompt": "x", "stop": "\\udc00"}', headers=raw), "stop")
    paired = b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}'  # a pair is a character: fine
    assert client.post("/v1/completions", content=paired, headers=raw).status_code == 200


def test_a_prompt_too_long_in_bytes_is_refused_before_it_is_tokenized(client, server):
    prompts = PromptBuilder.from_config(server.config)
    too_long = "word " * (prompts.max_prompt_bytes // 5 + 1)
    service = OpenAIService(LocalBackend(server), prompts, server.config.serve.model_copy(
        update={"max_request_body_bytes": 64 << 20}), "tiny")
    calls = []
    encode = prompts.tokenizer.encode
    prompts.tokenizer.encode = lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs)
    big_client = TestClient(build_api(service))
    start = time.perf_counter()
    response = big_client.post("/v1/completions", json={"prompt": too_long})
    _assert_400(response, "prompt")
    assert response.json()["error"]["code"] == "context_length_exceeded" and "bytes" in response.text
    chat = big_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": too_long}]})
    _assert_400(chat, "messages")
    assert calls == [] and time.perf_counter() - start < 5


def test_a_chunked_body_over_the_limit_is_413(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024  # 100 KiB in all, over the 64 KiB limit, with no Content-Length
        yield b'"}'

    response = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    small = client.post("/v1/completions", content=iter([b'{"prompt": "hi", ', b'"max_tokens": 1}']),
                        headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


def test_chat_without_max_tokens_stops_at_the_bounded_default(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "ignore_eos": True})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 7  # serve.default_chat_max_tokens
    assert response.json()["choices"][0]["finish_reason"] == "length"

