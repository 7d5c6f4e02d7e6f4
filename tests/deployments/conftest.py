"""Fixtures: one tiny model, one local Ray with one deployed app for the whole session, and
in-process LLM servers for the tests that need to reach inside (faults, queue bounds, timeouts).
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager

import httpx
import pytest

from cluster.config import (
    CacheSettings,
    LongctxConfig,
    ModelSettings,
    ParallelSettings,
    SchedulerSettings,
    ServeSettings,
)

BLOCK_SIZE = 16
NUM_KV_BLOCKS = 512  # 8,192 tokens a replica: a whole 4,096-token context plus company
MODEL = "tiny"  # the served name: the model folder's name


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from model_shards.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny"))


def _make_config(model_dir: str, executor: str = "local", **serve_fields) -> LongctxConfig:
    serve_settings = {"routing_block_tokens": BLOCK_SIZE, "max_request_body_bytes": 1 << 20, **serve_fields}
    return LongctxConfig(
        model=ModelSettings(path=model_dir),
        parallel=ParallelSettings(executor=executor),
        cache=CacheSettings(block_size=BLOCK_SIZE, num_device_blocks=NUM_KV_BLOCKS),
        scheduler=SchedulerSettings(max_tokens_per_step=512),
        serve=ServeSettings(**serve_settings),
    )


@pytest.fixture(scope="session")
def make_config(model_dir):
    """config(executor="local", **serve_fields): the tiny model with small KV blocks, Serve settings overridden."""
    return lambda **serve_fields: _make_config(model_dir, **serve_fields)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served(model_dir, local_ray):
    """Base URL of the app on a local Ray: 2 LLM server replicas, Ray actor workers."""
    from ray import serve

    from deployments.app import build_application

    config = _make_config(model_dir, executor="ray", num_replicas=2, ingress_num_cpus=0.5)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(config), name="longctx-test", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def deployed_app(served):
    """deployed_app(config, name): a context manager that deploys one more application on the
    session's Serve, as `longctx serve` deploys it (cluster/serve.py), under route /<name>, and
    yields its base URL. It shares the session app's HTTP proxy (Serve runs one per Ray) and
    deletes the application on exit, placement groups and model workers included, so that the
    shared Ray's CPUs are free again for the tests after it."""
    from ray import serve

    from cluster.serve import deploy

    host, port = served.removeprefix("http://").rsplit(":", 1)

    @contextmanager
    def deployed(config: LongctxConfig, name: str):
        try:
            deploy(config, host, int(port), name=name, route_prefix=f"/{name}")
            url = f"{served}/{name}"
            _wait_healthy(url)
            yield url
        finally:
            serve.delete(name)

    return deployed


@pytest.fixture(scope="session")
def metric_totals():
    """metric_totals(url): the app's /metrics as sample name -> value summed over labels (replicas, endpoints)."""
    from prometheus_client.parser import text_string_to_metric_families

    def totals(url: str) -> dict[str, float]:
        summed: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
            for sample in family.samples:
                summed[sample.name] = summed.get(sample.name, 0.0) + sample.value
        return summed

    return totals


@pytest.fixture
def abandoned_stream(metric_totals):
    """abandoned_stream(url, body, timeout_s): stream `body`, leave after 10 events while it runs,
    then wait until every KV block is free again and nothing runs -> /metrics totals then."""

    def leave(url: str, body: dict, timeout_s: float) -> dict[str, float]:
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(10):
                next(lines)
            assert metric_totals(url)["longctx_requests_running"] == 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            metrics = metric_totals(url)
            if metrics["longctx_kv_blocks_free"] == metrics["longctx_kv_blocks_capacity"] and \
                    not metrics["longctx_requests_running"]:
                return metrics
            time.sleep(0.05)
        raise AssertionError(f"blocks not freed: {metrics}")

    return leave


def _wait_healthy(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health").status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError("the app did not become healthy")


@pytest.fixture(scope="session")
def reference_engine(model_dir):
    """The engine called directly, in this process: what the HTTP API must reproduce."""
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(_make_config(model_dir))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def in_process_http(model_dir):
    """The whole HTTP API over one LLM server in this process (no Ray), as an httpx client: the
    official clients (openai, LangChain) take it as their `http_client`."""
    from fastapi.testclient import TestClient

    from deployments.api import OpenAIService, build_api
    from deployments.llm_server import LLMServer
    from deployments.local_backend import LocalBackend
    from deployments.prompts import PromptBuilder

    config = _make_config(model_dir)
    server = LLMServer(config)
    service = OpenAIService(LocalBackend(server), PromptBuilder.from_config(config), config.serve, MODEL)
    with TestClient(build_api(service), base_url="http://in-process") as http:
        yield http
    server.engine.shutdown()


@pytest.fixture(scope="session")
def in_process_openai(in_process_http):
    import openai

    return openai.OpenAI(base_url="http://in-process/v1", api_key="unused", max_retries=0, http_client=in_process_http)
