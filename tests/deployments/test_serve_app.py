"""The application on a real local Ray (one deployment for the session, 2 LLM server replicas with
Ray-actor model workers), driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from engine.offline import generate
from protocol.sampling_params import SamplingParams

MODEL = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the contract say?"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)


def _greedy(engine, prompt, max_tokens):
    return generate(engine, [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0][0]


def test_completions_stream_or_not_give_the_engine_s_greedy_text(client, reference_engine):
    prompt = "The contract says that the tenant"
    expected = _greedy(reference_engine, prompt, 24)
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert response.choices[0].text == expected.text
    assert response.usage.prompt_tokens == expected.num_prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_chat_uses_the_model_s_template_and_matches_the_engine(client, reference_engine):
    tokenizer = reference_engine.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    expected = _greedy(reference_engine, prompt_ids, 20)
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_logprobs_n_and_stop(client, reference_engine):
    completion = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and all(len(top) <= 2 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    assert [len(entry.top_logprobs) for entry in chat.choices[0].logprobs.content] == [3, 3, 3]
    several = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, n=3, temperature=1.0, seed=1)
    assert sorted(choice.index for choice in several.choices) == [0, 1, 2]
    assert several.usage.completion_tokens == 12
    text = _greedy(reference_engine, "Once upon", 24).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_models_health_and_metrics(client, served, metric_totals):
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("other")
    assert missing.value.body["code"] == "model_not_found"
    assert httpx.get(f"{served}/health").status_code == 200
    client.completions.create(model=MODEL, prompt="Once", max_tokens=1)  # request metrics exist after one
    metrics = metric_totals(served)
    for name in (
        "longctx_requests_total", "longctx_prompt_tokens_total", "longctx_generation_tokens_total",
        "longctx_time_to_first_token_seconds_count", "longctx_inter_token_latency_seconds_count",
        "longctx_requests_running", "longctx_requests_waiting", "longctx_queued_tokens",
        "longctx_kv_blocks_free", "longctx_kv_blocks_capacity",
    ):  # fmt: skip
        assert name in metrics, name
    assert metrics["longctx_kv_blocks_capacity"] == 2 * 512


def test_32_concurrent_streams_all_complete(served):
    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[str, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=f"request number {index}", max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage = "", None
        async for chunk in stream:
            text += "".join(choice.text for choice in chunk.choices)
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, index) for index in range(32)))

    results = asyncio.run(all_of_them())
    assert [tokens for _, tokens in results] == [16] * 32
    assert all(text for text, _ in results)


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(served, metric_totals):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{served}/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(40):  # 20 events and their blank separators
            next(lines)
        held = metric_totals(served)  # before the generator is closed: that would close the connection
        assert held["longctx_kv_blocks_free"] < held["longctx_kv_blocks_capacity"]
        assert held["longctx_requests_running"] == 1
    # The connection is closed; the 3,500 tokens would take seconds more to finish.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        metrics = metric_totals(served)
        if metrics["longctx_kv_blocks_free"] == metrics["longctx_kv_blocks_capacity"] and not metrics["longctx_requests_running"]:
            return
        time.sleep(0.02)
    raise AssertionError(f"blocks not freed: {metrics}")


def test_tokenize_counts_what_a_completion_sends_through_serve(served, client):
    text = "The contract says that the tenant"
    counted = httpx.post(f"{served}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30).json()
    completion = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0)
    assert counted["count"] == completion.usage.prompt_tokens == len(counted["tokens"])
    back = httpx.post(f"{served}/detokenize", json={"tokens": counted["tokens"]}, timeout=30).json()
    assert back["prompt"].endswith(text)


def test_a_shared_long_prefix_goes_to_the_replica_that_holds_it(client):
    document = " ".join(f"clause {i} binds the parties." for i in range(60))  # ~600 tokens
    first = client.completions.create(model=MODEL, prompt=document + " Question 0?", max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens > 300
    for question in range(1, 6):
        response = client.completions.create(model=MODEL, prompt=f"{document} Question {question}?", max_tokens=1, temperature=0)
        assert response.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 32


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/completions", {"prompt": "word " * 5000}, 400, "prompt", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages", "context_length_exceeded"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
        ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", None),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", None),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt", None),
        ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt", None),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", None),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "model_not_found"),
        ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413, None, "request_too_large"),
    ],
)
def test_bad_requests_get_their_status_and_openai_error_json(served, path, body, status, param, code):
    response = httpx.post(f"{served}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_malformed_json_is_a_400_in_openai_form(served):
    response = httpx.post(f"{served}/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
