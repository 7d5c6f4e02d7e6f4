"""POST /tokenize and /detokenize (deployments/tokenize_api.py) over the HTTP layer: counts equal the
tokenizer's and what a generation request would send, chat through the template, prompts longer
than the context counted (not refused), bad input as OpenAI error JSON, API keys enforced."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.api import OpenAIService, build_api
from deployments.prompts import PromptBuilder

MODEL = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does clause 4 say?"}]


class NoBackend:
    """Tokenizing never reaches a replica."""

    async def generate(self, request):
        raise AssertionError("tokenize reached the backend")
        yield

    async def replica_stats(self, timeout_s):
        return []

    async def replica_metrics(self, timeout_s):
        return []


@pytest.fixture(scope="module")
def prompts(make_config):
    return PromptBuilder.from_config(make_config())


@pytest.fixture(scope="module")
def client(make_config, prompts):
    service = OpenAIService(NoBackend(), prompts, make_config().serve, MODEL)
    return TestClient(build_api(service))


def test_a_text_s_count_and_ids_are_the_tokenizer_s(client, prompts):
    text = "The tenant shall pay the rent on the first day of each month."
    body = client.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    expected = prompts.tokenizer.encode(text)
    assert body["tokens"] == expected and body["count"] == len(expected)
    assert body["max_model_len"] == prompts.max_model_len
    assert "".join(body["token_strs"]) == prompts.tokenizer.decode(expected, skip_special_tokens=False)
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == prompts.tokenizer.encode(text, add_special_tokens=False)
    assert plain["token_strs"] is None


def test_a_chat_is_counted_as_the_chat_request_would_send_it(client, prompts):
    body = client.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    assert body["tokens"] == list(prompts.chat(CHAT))
    without_turn = client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    rendered = prompts.tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert without_turn["tokens"] == prompts.tokenizer.encode(rendered, add_special_tokens=False)
    assert without_turn["count"] < body["count"]


def test_a_prompt_longer_than_the_context_is_counted_not_refused(client, prompts):
    text = "clause " * (prompts.max_model_len + 100)
    response = client.post("/tokenize", json={"prompt": text})
    assert response.status_code == 200
    assert response.json()["count"] > prompts.max_model_len  # the client learns it does not fit
    refused = client.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


def test_detokenize_round_trips_and_refuses_ids_outside_the_vocabulary(client, prompts):
    text = "Each party keeps one copy."
    tokens = prompts.tokenizer.encode(text, add_special_tokens=False)
    assert client.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json() == {"prompt": text}
    bad = client.post("/detokenize", json={"tokens": [1, prompts.vocab_size]})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tokens" and str(prompts.vocab_size) in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": 7}, 400, "prompt"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_error_json(client, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"]
    assert error["param"] == param


def test_api_keys_guard_tokenize_like_the_rest_of_the_api(make_config, prompts):
    service = OpenAIService(NoBackend(), prompts, make_config().serve, MODEL)
    guarded = TestClient(build_api(service, {"secret": "tenant"}))
    assert guarded.post("/tokenize", json={"prompt": "x"}).status_code == 401
    allowed = guarded.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer secret"})
    assert allowed.status_code == 200 and allowed.json()["count"] >= 1


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_schemathesis_finds_no_server_error(client, path):
    """Requests generated from /openapi.json, valid and not: never a 5xx (ids far outside the
    vocabulary, texts with every kind of character, both bodies at once)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    operation = schemathesis.openapi.from_asgi("/openapi.json", client.app)[path]["POST"]
    statuses = []

    @given(case=operation.as_strategy())
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def call(case):
        response = case.call()
        assert response.status_code < 500 and '"server_error"' not in response.text, (case.body, response.text)
        statuses.append(response.status_code)

    call()
    assert statuses.count(200) > 5 and statuses.count(400) > 5, sorted(set(statuses))


def test_a_long_document_asked_about_twice_is_tokenized_once_and_exactly(client, prompts):
    """The chat's template text is cut into chunks (model_folder/chunked_encoding.py); the second
    question finds the document's chunks in the tokenizer's cache and only its own is encoded."""
    document = "".join(f"Clause {n}: the tenant pays {n * 7} on day {n % 28 + 1}.\nNotes follow here.\n"
                       for n in range(2_000))  # fmt: skip
    assert len(document) > 64 * 1024  # long enough to be chunked
    cache = prompts.tokenizer._encoder.cache
    counts = []
    for question in ("Who pays?", "When, for clause 12?"):
        chat = [{"role": "user", "content": f"{document}\n{question}"}]
        before = (cache.hits, cache.misses)
        body = client.post("/tokenize", json={"model": MODEL, "messages": chat}).json()
        rendered = prompts.tokenizer.apply_chat_template(chat)
        assert body["tokens"] == prompts.tokenizer.backend.encode(rendered, add_special_tokens=False).ids
        counts.append((cache.hits - before[0], cache.misses - before[1]))
    (first_hits, first_misses), (second_hits, second_misses) = counts
    assert first_misses > 4 and second_hits >= first_misses - 1 and second_misses <= 2
