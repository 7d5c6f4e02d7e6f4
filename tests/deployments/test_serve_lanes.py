"""The router's lanes on a real local Ray Serve (two LLM server replicas, the tiny model, the openai
client): two long prompts that arrive together share one replica, since each can wait the other's
prefill, and a short request right behind them gets the replica they left free (autoscaler/lanes.py)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

APP = "lanes"
MODEL = "tiny"
LONG_PROMPT_TOKENS = 2000  # "long" for this app: serve.routing_long_prompt_tokens is 1,000


@pytest.fixture(scope="module")
def lanes_url(make_config, deployed_app):
    config = make_config(executor="local", num_replicas=2, ingress_num_cpus=0.5,
                         routing_long_prompt_tokens=1000, routing_short_lanes=1,
                         # the router counts what it sent until the next report: all of this test
                         routing_stats_period_s=5.0)
    with deployed_app(config, APP) as url:
        yield url


def _running_by_replica(url: str) -> dict[str, float]:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "longctx_requests_running":
            return {sample.labels["replica"]: sample.value for sample in family.samples}
    return {}


def _wait_for_running(url: str, total: int, timeout_s: float = 60) -> list[float]:
    """Running sequences per replica, sorted, once they add up to `total`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = _running_by_replica(url)
        if sum(running.values()) == total:
            return sorted(running.values())
        time.sleep(0.05)
    raise AssertionError(f"never {total} running; last per replica: {running}")


def _complete(client: openai.OpenAI, prompt, max_tokens: int) -> int:
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_body={"ignore_eos": True})
    return response.usage.completion_tokens


def _long_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(LONG_PROMPT_TOKENS)]


@pytest.mark.slow
def test_two_long_prompts_share_a_replica_and_a_short_request_gets_the_free_one(lanes_url):
    client = openai.OpenAI(base_url=f"{lanes_url}/v1", api_key="unused", max_retries=0, timeout=300)
    _wait_for_running(lanes_url, 0)
    assert len(_running_by_replica(lanes_url)) == 2
    with ThreadPoolExecutor(max_workers=3) as pool:
        # Same length: whichever the router sees second waits at most its own prefill behind the first.
        # A short request right behind them, while their prompts are queued: the free replica.
        # Outputs long enough that all three run together for seconds: the replicas now stream
        # with less overhead, and 300 tokens could end before a poll of a loaded machine saw them.
        long = [pool.submit(_complete, client, _long_prompt(seed), 1200) for seed in (1, 2)]
        time.sleep(0.05)
        short = pool.submit(_complete, client, "What does clause 7 say?", 1200)
        assert _wait_for_running(lanes_url, 3) == [1, 2]
        assert [future.result() for future in long] == [1200, 1200] and short.result() == 1200
