"""The LLM server that serves the HTTP API itself: one replica, no separate ingress.

With one LLM server replica there is nothing to route (`LongctxConfig.serves_http_from_llm_server`),
so the Serve proxy sends HTTP straight to the replica that owns the engine: the API runs over a
`LocalBackend` of this very server. That saves, per request, a routed Serve call and, per
streamed chunk, one Ray message between replicas (docs/benchmarks.md, session 5). The replica
keeps every method Serve and `longctx serve` call on an LLM server (health, stats, autoscaling).
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from deployments.ingress import http_app
from deployments.llm_server import LLMServer
from deployments.local_backend import LocalBackend


@serve.ingress()
class LLMServerWithAPI(LLMServer):
    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(LocalBackend(self), self.config)
