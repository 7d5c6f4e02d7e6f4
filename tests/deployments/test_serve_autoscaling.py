"""The queued-context autoscaler on a real local Ray Serve, with the tiny model and real HTTP: a
burst of long prompts scales 1 -> 3 replicas, idleness back to 1, and no request fails or is cut
while replicas go, not even the long ones still running when the load first drops."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

APP = "autoscaled"
MODEL = "tiny"
MAX_REPLICAS = 3
LONG_PROMPT_TOKENS = 2500  # "long" for this test's policy: long_request_tokens is 2,000


@pytest.fixture(scope="module")
def autoscaled_url(make_config, deployed_app):
    # Small intervals for a 2-core machine. A configured prefill rate of 1,000 tokens/s makes the
    # burst's queued prompts minutes of work to the policy, whatever the CPU's real speed.
    config = make_config(executor="local", ingress_num_cpus=0.5, drain_timeout_s=30).with_overrides({
        "autoscaling.enabled": True,
        "autoscaling.min_replicas": 1,
        "autoscaling.max_replicas": MAX_REPLICAS,
        "autoscaling.prefill_tokens_per_s": 1000.0,
        "autoscaling.ttft_target_s": 2.0,
        "autoscaling.interactive_ttft_s": 1.0,
        "autoscaling.spare_replicas": 1,
        "autoscaling.downscale_delay_s": 3.0,
        "autoscaling.replica_startup_s": 1.0,
        "autoscaling.metrics_push_interval_s": 0.5,
        "autoscaling.long_request_tokens": 2000,
    })
    with deployed_app(config, APP) as url:
        yield url


class ReplicaWatch:
    """Samples the LLM server's replica states every 0.2 s: (time, running, stopping)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray import serve

        while not self._stop.wait(0.2):
            states = serve.status().applications[APP].deployments["LLMServer"].replica_states
            self.samples.append((time.monotonic(), states.get("RUNNING", 0), states.get("STOPPING", 0)))

    def wait_for(self, predicate, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.samples and predicate(*self.samples[-1][1:]):
                return self.samples[-1][0]
            time.sleep(0.2)
        raise AssertionError(f"replicas never got there; last (time, running, stopping): {self.samples[-3:]}")

    def first_downscale_after(self, start: float) -> float:
        return next(at for at, running, stopping in self.samples if at > start and (stopping or running < MAX_REPLICAS))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _complete(client: openai.OpenAI, prompt, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, when it ended); all max_tokens of them, or the request was cut."""
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    return response.usage.completion_tokens, time.monotonic()


def _long_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(LONG_PROMPT_TOKENS)]


@pytest.mark.slow
def test_a_burst_of_long_prompts_scales_out_and_idleness_scales_back_without_cutting_a_request(autoscaled_url):
    client = openai.OpenAI(base_url=f"{autoscaled_url}/v1", api_key="unused", max_retries=0, timeout=300)
    watch = ReplicaWatch()
    try:
        watch.wait_for(lambda running, stopping: running == 1, timeout_s=30)
        with ThreadPoolExecutor(max_workers=16) as pool:
            # Two fit a replica's KV cache at a time, and each decodes for seconds: the burst is
            # still running on the first replica when the others are up.
            burst = [pool.submit(_complete, client, _long_prompt(seed), 1000) for seed in range(6)]
            watch.wait_for(lambda running, stopping: running == MAX_REPLICAS, timeout_s=120)
            # While scaled out and then scaling in, short requests keep arriving; none may fail.
            shorts = []
            for index in range(40):
                shorts.append(pool.submit(_complete, client, f"Question {index}: what does clause {index} say?", 8))
                time.sleep(0.25)
            burst_results = [future.result() for future in burst]
            watch.wait_for(lambda running, stopping: running == 1 and stopping == 0, timeout_s=120)
            short_results = [future.result() for future in shorts]
        last_long_done = max(done_at for _, done_at in burst_results)
        scaled_out_at = next(at for at, running, _ in watch.samples if running == MAX_REPLICAS)
    finally:
        watch.close()
    assert [tokens for tokens, _ in burst_results] == [1000] * 6
    assert [tokens for tokens, _ in short_results] == [8] * 40
    assert scaled_out_at < last_long_done  # the premise: scaled out while the burst still ran
    # No replica went while a long prompt was still in flight (0.5 s: the client sees the end last).
    assert watch.first_downscale_after(scaled_out_at) >= last_long_done - 0.5
