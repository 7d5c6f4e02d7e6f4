"""`LLMBackend` over an LLM server in this process: the HTTP API without Ray (tests, benches)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from deployments.generation import Reply
from deployments.llm_server import LLMServer
from deployments.messages import GenerateRequest


class LocalBackend:
    def __init__(self, server: LLMServer):
        self.server = server

    def generate(self, request: GenerateRequest) -> AsyncIterator[Reply]:
        return self.server.generate(request)

    async def replica_stats(self, timeout_s: float) -> list[dict]:
        return [self.server.stats()]

    async def replica_metrics(self, timeout_s: float) -> list[dict]:
        return [await self.server.metrics_snapshot()]
