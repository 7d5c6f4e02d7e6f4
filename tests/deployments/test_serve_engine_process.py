"""A Serve replica whose engine runs in a child process (`serve.engine_loop: process`) serves
the OpenAI API as a replica with the engine on a thread does: the same greedy completion, its
engine's KV series in the ingress's /metrics (fetched from the child without blocking the replica's
event loop), and a healthy /health."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

APP = "longctx-engine-process"
MODEL = "tiny"
PROMPT = "The engine runs in its own process"


@pytest.fixture(scope="module")
def process_url(make_config, deployed_app):
    with deployed_app(make_config(ingress_num_cpus=0.5, engine_loop="process"), APP) as url:
        yield url


def _greedy(url: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text


def test_a_replica_with_its_engine_in_a_child_process_serves_like_one_with_a_thread(process_url, served):
    assert _greedy(process_url) == _greedy(served)
    assert httpx.get(f"{process_url}/health", timeout=30).status_code == 200
    text = httpx.get(f"{process_url}/metrics", timeout=30).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    hits = families["longctx_kv_hit_tokens"].samples
    assert hits and all(sample.labels["replica"] for sample in hits)
