"""deployments/disconnects.py through the app's own ASGI interface: a client that leaves before
its response stops its request (the backend's generator is closed: the engine aborts it), for a
non-streamed request and for a stream still waiting for its first token; a client that stays gets
its answer."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.api import OpenAIService, build_api
from deployments.prompts import PromptBuilder
from engine.outputs import CompletionDelta

MODEL = "tiny"


class SlowBackend:
    """Answers one token after `delay_s` (a long prefill), and records whether it was closed
    before (an abort) or after answering."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.started = asyncio.Event()
        self.closed_before_answer = False

    async def generate(self, request):
        self.started.set()
        try:
            await asyncio.sleep(self.delay_s)
        except BaseException:  # cancelled or closed while "prefilling"
            self.closed_before_answer = True
            raise
        yield [CompletionDelta(request.request_id, 0, "x", (5,), (), True, "length", len(request.prompt_token_ids), 1, 0)]

    async def replica_stats(self, timeout_s):
        return []

    async def replica_metrics(self, timeout_s):
        return []


@pytest.fixture(scope="module")
def prompts(make_config):
    return PromptBuilder.from_config(make_config())


def _app(make_config, prompts, backend):
    return build_api(OpenAIService(backend, prompts, make_config().serve, MODEL))


async def _call(app, body: dict, leave_after_s: float | None) -> tuple[int | None, float]:
    """POST /v1/completions; the client disconnects `leave_after_s` after sending (None: stays).
    Returns (the status the app sent, or None, and seconds until the app returned)."""
    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}  # fmt: skip
    sent_body, statuses = False, []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        if leave_after_s is None:
            await asyncio.Event().wait()  # never: the client stays until the response
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return (statuses[0] if statuses else None), asyncio.get_running_loop().time() - started


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_its_first_token_stops_its_request(make_config, prompts, stream):
    backend = SlowBackend(delay_s=20)
    body = {"model": MODEL, "prompt": "A long document", "max_tokens": 1, "stream": stream}
    _, seconds = asyncio.run(_call(_app(make_config, prompts, backend), body, leave_after_s=0.2))
    assert backend.started.is_set() and backend.closed_before_answer
    assert seconds < 5  # not the backend's 20 s


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_stays_gets_its_answer(make_config, prompts, stream):
    backend = SlowBackend(delay_s=0.3)
    body = {"model": MODEL, "prompt": "A long document", "max_tokens": 1, "stream": stream}
    status, _ = asyncio.run(_call(_app(make_config, prompts, backend), body, leave_after_s=None if not stream else 5))
    assert status == 200 and not backend.closed_before_answer
