"""A real LLM server replica killed while it streams an answer (real local Ray Serve, two replicas,
the tiny model): the client gets the stream's error event with code `replica_lost` and the
stream's end, not a broken connection or a 500; the next request is answered by the replica left.
The retry of a request whose replica was lost before answering: tests/deployments/test_replica_loss.py."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

APP = "replica-loss"
MODEL = "tiny"


@pytest.fixture(scope="module")
def loss_url(make_config, deployed_app):
    config = make_config(executor="local", num_replicas=2, ingress_num_cpus=0.5)
    with deployed_app(config, APP) as url:
        yield url


def _running_replica(url: str, timeout_s: float = 30) -> str:
    """The replica label (its unique id) with one running request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
            if family.name == "longctx_requests_running":
                busy = [sample.labels["replica"] for sample in family.samples if sample.value == 1]
                if busy:
                    return busy[0]
        time.sleep(0.05)
    raise AssertionError("no replica ever ran the request")


def _kill_replica(unique_id: str) -> None:
    """Kills the LLM server replica's actor (named as Serve names it: ReplicaID.to_full_id_str)."""
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#LLMServer#{unique_id}", namespace="serve"))


@pytest.mark.slow
def test_a_replica_killed_mid_stream_ends_the_stream_with_replica_lost(loss_url):
    body = {"model": MODEL, "prompt": "The lease says", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{loss_url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(20):  # 10 events and their blank separators: the replica is answering
            next(lines)
        _kill_replica(_running_replica(loss_url))
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    errors = [json.loads(event)["error"] for event in events[:-1] if '"error"' in event]
    assert len(errors) == 1 and errors[0]["code"] == "replica_lost", events[-3:]
    client = openai.OpenAI(base_url=f"{loss_url}/v1", api_key="unused", max_retries=0, timeout=60)
    after = client.completions.create(model=MODEL, prompt="The lease says", max_tokens=8, temperature=0)
    assert after.usage.completion_tokens == 8
