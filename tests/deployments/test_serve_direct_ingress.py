"""The one-replica application behind Serve's direct ingress (deployments/app.py
`direct_ingress_env`): the client talks HTTP to the LLM server replica itself, no proxy in
between. What users rely on is the same as through the proxy: the engine's greedy text in
order with usage, OpenAI error JSON, cancellation when the client leaves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from engine.offline import generate
from protocol.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
SERVER_SCRIPT = Path(__file__).with_name("direct_ingress_server.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ports(model_dir):
    """(replica port, proxy port) of the application in its own process."""
    server = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), model_dir], cwd=REPO_ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = server.stdout.readline()
        assert line.startswith("ready"), f"the server did not start: {line!r}"
        replica_port, proxy_port = (int(word) for word in line.split()[1:])
        yield replica_port, proxy_port
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def url(ports):
    return f"http://127.0.0.1:{ports[0]}"


def test_the_replica_answers_on_its_own_port_and_the_proxy_still_routes(ports):
    replica_port, proxy_port = ports
    assert replica_port != proxy_port
    for port in ports:
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"


def test_the_stream_is_the_engine_s_greedy_text_in_order_with_usage(url, make_config):
    from engine.llm_engine import LLMEngine

    prompt = "The contract says that the tenant"
    engine = LLMEngine(make_config())
    try:
        expected = generate(engine, [prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0][0]
    finally:
        engine.shutdown()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len(texts) == 24
    assert "".join(texts) == expected.text
    assert (chunks[-1].usage.completion_tokens, chunks[-1].usage.prompt_tokens) == (24, expected.num_prompt_tokens)


def test_bad_requests_get_openai_error_json(url):
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "temperature": -1}, timeout=30)
    assert (response.status_code, response.json()["error"]["param"]) == (400, "temperature")


def test_a_client_that_disconnects_frees_its_blocks(url, abandoned_stream):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    metrics = abandoned_stream(url, body, timeout_s=5.0)
    assert metrics["longctx_kv_blocks_free"] == metrics["longctx_kv_blocks_capacity"]
