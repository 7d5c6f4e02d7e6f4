"""The default application of one replica on a real local Ray: the LLM server serves HTTP itself
(no OpenAIIngress hop) and runs its model worker in process. What users rely on is unchanged:
the engine's greedy text in order, usage, OpenAI error JSON, metrics, cancellation on disconnect;
and a stream delivers tokens as they are computed, not in bursts.

The model is the `small` preset (8 layers, hidden 512): a decode step takes milliseconds on a
CPU, longer than a streamed chunk takes to reach the client, so a stream that held tokens back
would show."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from engine.offline import generate
from protocol.sampling_params import SamplingParams

APP = "streaming"
MODEL = "small"


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    from cluster.config import CacheSettings, LongctxConfig, ModelSettings, SchedulerSettings, ServeSettings
    from model_shards.make_model import make_model

    model_dir = make_model(tmp_path_factory.mktemp("small") / MODEL, MODEL, max_position_embeddings=4096)
    return LongctxConfig(
        model=ModelSettings(path=str(model_dir)),
        cache=CacheSettings(block_size=16, num_device_blocks=512),
        scheduler=SchedulerSettings(max_tokens_per_step=512),
        serve=ServeSettings(routing_block_tokens=16),
    )


@pytest.fixture(scope="module")
def url(small_config, deployed_app):
    with deployed_app(small_config, APP) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_one_replica_serves_http_itself_with_its_worker_in_process(url, small_config):
    from ray import serve

    from deployments.app import llm_server_options

    assert small_config.serves_http_from_llm_server
    assert set(serve.status().applications[APP].deployments) == {"LLMServer"}
    assert "placement_group_bundles" not in llm_server_options(small_config)  # no model worker actor


def test_the_stream_is_the_engine_s_greedy_text_in_order_with_usage(client, small_config):
    from engine.llm_engine import LLMEngine

    prompt = "The contract says that the tenant"
    engine = LLMEngine(small_config)
    try:
        expected = generate(engine, [prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0][0]
    finally:
        engine.shutdown()
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len(texts) == 24  # one chunk per token, in the engine's order
    assert "".join(texts) == expected.text
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == expected.num_prompt_tokens


def test_a_stream_yields_its_first_token_while_the_rest_are_still_computed(url, metric_totals):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True, "stream": True}
    arrivals = []
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            arrivals.append(time.perf_counter())
            if len(arrivals) == 1:  # the request must still be running: 31 tokens are still to compute
                assert metric_totals(url)["longctx_requests_running"] == 1
    assert len(arrivals) == 32
    # Not in bursts: the tokens arrive spread over the generation, not all at its end.
    first, last = arrivals[0], arrivals[-1]
    assert sum(1 for when in arrivals if when < first + (last - first) / 2) >= 8


def test_bad_requests_still_get_openai_error_json(url):
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "temperature": -1}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "temperature"
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "word " * 5000}, timeout=30)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "context_length_exceeded")


def test_a_client_that_disconnects_frees_its_blocks_and_is_counted(url, metric_totals, abandoned_stream):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    counted_before = metric_totals(url).get("longctx_requests_total", 0.0)
    metrics = abandoned_stream(url, body, timeout_s=2.0)
    assert metrics["longctx_requests_total"] == counted_before + 1  # counted, as a client that left
