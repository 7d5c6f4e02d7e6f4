"""The LLM server in process (no Ray): its bounded queue, per-request deadline, engine failures
and stalls, each seen through the HTTP API where the client would see it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from deployments.admission import AdmissionQueue
from deployments.api import OpenAIService, build_api
from deployments.llm_server import LLMServer
from deployments.local_backend import LocalBackend
from deployments.messages import GenerateRequest, ServeError
from deployments.prompts import PromptBuilder
from protocol.sampling_params import SamplingParams

LONG_RUN = {"prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def server_factory(make_config):
    servers = []

    def start(**serve_fields) -> LLMServer:
        server = LLMServer(make_config(**serve_fields))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.engine.shutdown()


def _client(server: LLMServer) -> TestClient:
    prompts = PromptBuilder.from_config(server.config)
    service = OpenAIService(LocalBackend(server), prompts, server.config.serve, "tiny")
    return TestClient(build_api(service))


def _wait_until_all_blocks_free(server: LLMServer, timeout_s: float = 2.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        stats = server.stats()
        if stats["num_free_kv_blocks"] == stats["num_total_kv_blocks"] and stats["num_running"] == 0:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"KV blocks still held: {server.stats()}")


def test_admission_queue_bounds_requests_and_tokens():
    queue = AdmissionQueue(max_requests=2, max_tokens=100)
    big = queue.try_admit(150)  # alone in the queue: admitted though larger than the bound
    assert big is not None
    assert queue.try_admit(1) is None  # 150 + 1 > 100
    queue.leave(big)
    queue.leave(big)  # idempotent
    assert queue.num_requests == 0 and queue.num_tokens == 0
    first, second = queue.try_admit(10), queue.try_admit(10)
    assert first and second and queue.try_admit(1) is None  # two requests at most


def test_a_full_queue_answers_429_and_admits_again_once_it_drains(server_factory):
    server = server_factory(max_queued_requests=1)
    prompt = list(range(1, 40))

    async def scenario():
        first = server.generate(GenerateRequest("a", prompt, SamplingParams(max_tokens=4)))
        first_reply = asyncio.ensure_future(anext(first))
        await asyncio.sleep(0)  # "a" is admitted and waits for its first token
        refused = await anext(server.generate(GenerateRequest("b", prompt, SamplingParams(max_tokens=4))))
        assert isinstance(refused, ServeError) and refused.status == 429 and refused.retry_after_s == 5
        assert isinstance(await first_reply, list)
        async for _ in first:
            pass
        replies = [reply async for reply in server.generate(GenerateRequest("c", prompt, SamplingParams(max_tokens=4)))]
        assert all(isinstance(reply, list) for reply in replies)

    asyncio.run(scenario())


def test_the_request_deadline_is_504_and_frees_the_blocks(server_factory):
    server = server_factory(request_timeout_s=0.3)
    client = _client(server)
    response = client.post("/v1/completions", json=LONG_RUN)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    _wait_until_all_blocks_free(server)
    streamed = client.post("/v1/completions", json={**LONG_RUN, "stream": True})
    assert streamed.status_code == 200  # headers left with the first token
    assert '"code": "request_timeout"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
    _wait_until_all_blocks_free(server)


def test_an_engine_failure_is_500_and_fails_the_health_check(server_factory):
    server = server_factory()
    client = _client(server)
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    server.check_health()

    def broken_step():
        raise RuntimeError("device lost")

    server.engine.engine.step = broken_step
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "engine_error"
    with pytest.raises(RuntimeError, match="not running"):
        server.check_health()
    # A request arriving after the engine stopped is no engine failure of its own: another replica
    # can serve it (the ingress routes it again: test_replica_loss.py); alone here, a 503, no hang.
    after = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert after.status_code == 503 and after.json()["error"]["code"] == "replica_unavailable"
    assert after.headers["Retry-After"] == str(server.config.serve.retry_after_s)
    assert client.get("/health").status_code == 503


def test_a_request_that_fails_in_its_step_is_a_500_for_its_caller_alone(server_factory):
    server = server_factory()
    worker = server.engine.engine.executor.worker
    sample = worker.sampler

    def failing_for_seed_13(logits, states):
        if any(state.params.seed == 13 for state in states):
            raise RuntimeError("injected")
        return sample(logits, states)

    worker.sampler = failing_for_seed_13
    client = _client(server)
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "seed": 13})
    assert response.status_code == 500 and response.json()["error"]["code"] == "request_failed"
    assert "injected" in response.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    server.check_health()
    _wait_until_all_blocks_free(server)


def test_a_stalled_step_fails_the_health_check(server_factory):
    server = server_factory(stall_timeout_s=0.2)
    executor = server.engine.engine.executor
    execute = executor.execute

    def slow_execute(step_input):
        time.sleep(0.6)
        return execute(step_input)

    executor.execute = slow_execute
    client = _client(server)

    async def scenario():
        request = GenerateRequest("slow", [1, 2, 3], SamplingParams(max_tokens=1))
        replies = asyncio.ensure_future(_drain(server.generate(request)))
        await asyncio.sleep(0.4)
        with pytest.raises(RuntimeError, match="has not finished a step"):
            server.check_health()
        await replies

    asyncio.run(scenario())
    server.check_health()
    assert client.get("/health").status_code == 200


async def _drain(replies):
    return [reply async for reply in replies]


def test_chat_without_max_tokens_gets_its_default_lowered_to_the_kv_room(server_factory):
    server = server_factory()
    request = GenerateRequest("c", [1, 2, 3], SamplingParams(max_tokens=4096), fill_max_tokens=True)
    assert server._params(request).max_tokens == 4096 - 3
    bounded = GenerateRequest("c", [1, 2, 3], SamplingParams(max_tokens=100), fill_max_tokens=True)
    assert server._params(bounded).max_tokens == 100


def test_a_request_larger_than_the_replica_s_kv_cache_is_a_400(make_config):
    config = make_config()
    config = config.model_copy(update={"cache": config.cache.model_copy(update={"num_device_blocks": 8})})
    server = LLMServer(config)  # 8 blocks of 16 tokens
    try:
        request = GenerateRequest("big", list(range(1, 101)), SamplingParams(max_tokens=100))

        async def first_reply():
            return await anext(server.generate(request))

        reply = asyncio.run(first_reply())
        assert isinstance(reply, ServeError) and reply.status == 400
        assert (reply.param, reply.code) == ("prompt", "context_length_exceeded")
    finally:
        server.engine.shutdown()


def test_a_client_gone_before_admission_leaves_the_engine_running(server_factory):
    server = server_factory()
    params = SamplingParams(max_tokens=300, ignore_eos=True)

    async def scenario():
        busy = asyncio.ensure_future(_drain(server.generate(GenerateRequest("busy", [5] * 32, params))))
        await asyncio.sleep(0.05)  # the engine thread is in a step: new commands wait for it
        for index in range(10):
            gone = asyncio.ensure_future(_drain(server.generate(GenerateRequest(f"gone-{index}", [5] * 32, params))))
            for _ in range(3):
                await asyncio.sleep(0)  # its add_request is queued for the engine thread
            gone.cancel()
        return await busy

    replies = asyncio.run(scenario())
    assert all(isinstance(reply, list) for reply in replies)
    server.check_health()


def test_streams_share_the_chunk_budget_first_token_at_once_every_token_in_order(server_factory, reference_engine):
    from engine.offline import generate

    paced = server_factory(stream_chunks_per_s=10)  # one stream: a list at most every 0.1 s
    unpaced = server_factory(stream_chunks_per_s=0)  # a list per engine step
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    expected = generate(reference_engine, [[5, 6, 7]], params)[0][0].token_ids

    async def lists(server: LLMServer, request_id: str) -> tuple[list[list], float]:
        start, replies = time.monotonic(), []
        async for reply in server.generate(GenerateRequest(request_id, [5, 6, 7], params)):
            assert not isinstance(reply, ServeError), reply
            replies.append((time.monotonic() - start, reply))
        return replies, time.monotonic() - start

    paced_lists, paced_s = asyncio.run(lists(paced, "paced"))
    unpaced_lists, _ = asyncio.run(lists(unpaced, "unpaced"))
    for replies in (paced_lists, unpaced_lists):
        assert [t for _, batch in replies for delta in batch for t in delta.token_ids] == list(expected)
    assert len(paced_lists[0][1]) == 1  # the first token did not wait for company
    assert len(paced_lists) <= paced_s / 0.1 + 2  # at most one list per 0.1 s, plus the first and the last
    assert len(paced_lists) < len(unpaced_lists)
    gaps = [b - a for (a, _), (b, _) in zip(paced_lists[1:-1], paced_lists[2:-1])]
    assert all(gap >= 0.09 for gap in gaps), gaps


POISON = 1000  # a token id only the culprit's prompt holds (the tiny vocabulary is 1024)


def _out_of_memory_on_poison(model) -> None:
    """The model's forward runs, then raises CUDA's out-of-memory error for a batch holding POISON."""
    forward = model.forward

    def forward_then_fail(input_ids, *rest):
        hidden = forward(input_ids, *rest)
        if bool((input_ids == POISON).any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return hidden

    model.forward = forward_then_fail


def test_a_forward_pass_that_runs_out_of_memory_fails_its_own_request_through_the_openai_client(server_factory):
    server = server_factory()
    http = _client(server)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    others = [list(range(10 + 7 * i, 40 + 7 * i)) for i in range(3)]

    def complete(prompt: list[int]) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    reference = [complete(prompt) for prompt in others]
    _out_of_memory_on_poison(server.engine.engine.executor.worker.model)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        culprit = pool.submit(complete, list(range(50, 90)) + [POISON])
        texts = list(pool.map(complete, others))
        with pytest.raises(openai.InternalServerError) as failed:
            culprit.result()
    assert texts == reference
    assert failed.value.body["code"] == "request_failed" and "out of GPU memory in its" in failed.value.body["message"]
    with pytest.raises(openai.APIError, match="out of GPU memory"):  # streamed: an error event, then the end
        list(client.completions.create(model="tiny", prompt=[POISON, 5, 6], max_tokens=4, stream=True))
    assert complete(others[0]) == reference[0] and server.engine.is_alive
    assert 'longctx_requests_total{endpoint="completions",status="500"} 2.0' in http.get("/metrics").text
    _wait_until_all_blocks_free(server)


def test_a_replica_in_its_own_process_counts_that_process_s_collections(make_config, monkeypatch):
    """A Serve replica (own_process) freezes its start-up objects (not here: this test process goes on)
    and exports its process's garbage collections with its series, whatever thread made them."""
    import gc

    from deployments import llm_server

    frozen = []
    monkeypatch.setattr(llm_server, "freeze_startup_objects", lambda: frozen.append(True))
    server = LLMServer(make_config(), own_process=True)
    try:
        assert frozen == [True]
        gc.collect(2)
        exposition = asyncio.run(server.metrics_snapshot())["exposition"]
        full = [line for line in exposition.splitlines()
                if line.startswith('longctx_replica_gc_collections_total{generation="2"}')]
        assert full and float(full[0].split()[-1]) >= 1
    finally:
        server.__del__()
    assert server.gc_metrics.pauses._on_collection not in gc.callbacks
    assert LLMServer.__init__.__defaults__ == (False,)  # a test's or a bench's server counts nothing
