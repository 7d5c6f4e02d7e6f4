"""One request's reply stream as the ingress consumes it: deadline, errors, timing, cleanup.

`ReplyStream.close()` is the single cleanup path for a request that ends early (client gone,
deadline, error): it closes the backend's generator, which cancels the Serve call, which
cancels the replica's generator, which aborts the request in the engine and frees its KV
blocks before the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

from deployments.errors import APIError, api_error
from deployments.messages import GenerateRequest, ServeError
from deployments.metrics import ServingMetrics
from deployments.responses import Usage
from engine.outputs import CompletionDelta

Reply = list[CompletionDelta] | ServeError
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; only ever a metric label


class LLMBackend(Protocol):
    """What the HTTP layer needs from the LLM servers (Serve handles, or a server in process)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Reply]: ...

    async def replica_stats(self, timeout_s: float) -> list[dict]: ...

    async def replica_metrics(self, timeout_s: float) -> list[dict]:
        """replica_stats plus each replica's own registry as exposition text (`exposition`)."""
        ...


class ReplyStream:
    def __init__(self, replies: AsyncIterator[Reply], timeout_s: float):
        self._replies = replies
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._timeout_s = timeout_s

    async def next_batch(self) -> list[CompletionDelta] | None:
        """The next deltas, or None at the end. A replica's error or the deadline raise APIError."""
        try:
            # A timer handle per wait, not a task as asyncio.wait_for makes: this runs per token.
            async with asyncio.timeout_at(self._deadline):
                item = await anext(self._replies)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise api_error(504, f"the request did not finish within {self._timeout_s:g} s", code="request_timeout") from None
        if isinstance(item, ServeError):
            raise APIError(item)
        return item

    async def close(self) -> None:
        await self._replies.aclose()


class RequestTimer:
    """TTFT, inter-token latency, duration and token counts of one request, as the client sees them."""

    def __init__(self, metrics: ServingMetrics, endpoint: str):
        self.metrics = metrics
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self._first_token_seen = False
        self._last_token_time: dict[int, float] = {}

    def on_deltas(self, deltas: list[CompletionDelta]) -> None:
        now = time.perf_counter()
        for delta in deltas:
            if not delta.token_ids:
                continue
            if not self._first_token_seen:
                self._first_token_seen = True
                self.metrics.ttft.observe(now - self.start)
            previous = self._last_token_time.get(delta.index)
            if previous is not None:
                self.metrics.itl.observe(now - previous)
            self._last_token_time[delta.index] = now

    def finish(self, status: int, usage: Usage | None = None) -> None:
        self.metrics.requests.labels(self.endpoint, str(status)).inc()
        if usage is None or status != 200:
            return
        self.metrics.duration.observe(time.perf_counter() - self.start)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.generation_tokens.inc(usage.completion_tokens)
        self.metrics.prefix_hit_tokens.inc(usage.cached_tokens)
