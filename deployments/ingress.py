"""The HTTP ingress deployment: the FastAPI app of deployments/api.py over Serve handles to the
LLM server deployment.

The app is built per replica (`__serve_build_asgi_app__`), after the constructor has loaded
the tokenizer, so routes close over this replica's state instead of module-level globals.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import context as serve_context
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from cluster.config import LongctxConfig, load_config_dict
from deployments.api import OpenAIService, build_api
from deployments.generation import LLMBackend, Reply
from deployments.messages import REPLICA_UNAVAILABLE, GenerateRequest, ServeError, overloaded
from deployments.prompts import PromptBuilder
from deployments.tenants import load_api_keys

logger = logging.getLogger(__name__)


# A replica lost before it answered (its process died, its node went away, or it answered only that
# its engine had stopped): the request is routed again, to another replica, this many times in all.
# Nothing reached the client yet, so a second attempt is the same request; after the first reply a
# lost replica ends the request with a 503.
MAX_ROUTING_ATTEMPTS = 3
REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)  # ActorDiedError is a RayActorError


class HandleBackend:
    """`LLMBackend` over a Serve handle: streaming calls, routed by the deployment's router."""

    def __init__(self, handle: DeploymentHandle, retry_after_s: int):
        self._handle = handle
        self._generate = handle.options(method_name="generate", stream=True)
        self._retry_after_s = retry_after_s

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Reply]:
        for attempt in range(1, MAX_ROUTING_ATTEMPTS + 1):
            lost: list[BaseException] = []
            async for reply in self._one_attempt(request, lost):
                yield reply
            if not lost:
                return
            logger.warning("request %s: its replica was lost before answering (%r); attempt %d of %d",
                           request.request_id, lost[0], attempt, MAX_ROUTING_ATTEMPTS)
        yield ServeError(503, f"{MAX_ROUTING_ATTEMPTS} replicas were lost before one answered; retry later",
                         "service_unavailable_error", None, "replica_lost", self._retry_after_s)

    async def _one_attempt(self, request: GenerateRequest, lost: list[BaseException]) -> AsyncIterator[Reply]:
        """The replies of one routed call. A replica lost before its first reply is appended to
        `lost` (the caller routes the request again); after it, the request ends with a 503."""
        response = contextvars.copy_context().run(self._call_of_its_own, request)
        finished, answered = False, False
        try:
            async for reply in response:
                if not answered and isinstance(reply, ServeError) and reply.code == REPLICA_UNAVAILABLE:
                    lost.append(RuntimeError(reply.message))  # its engine had stopped: as if lost
                    finished = True
                    return
                answered = True
                yield reply
            finished = True
        except BackPressureError as error:  # every replica full and the handle's queue too
            finished = True
            yield overloaded(f"all replicas are busy: {error}", self._retry_after_s)
        except DeploymentUnavailableError:  # the application is being deleted or redeployed
            finished = True
            yield ServeError(503, "the model server is not available", "service_unavailable_error")
        except REPLICA_LOST as error:
            finished = True
            if not answered:
                lost.append(error)
                return
            yield ServeError(503, f"the replica serving this request was lost after it started answering "
                                  f"({type(error).__name__}); retry the request", "service_unavailable_error",
                             None, "replica_lost")
        finally:
            if not finished:
                response.cancel()  # the replica aborts the request and frees its KV blocks

    def _call_of_its_own(self, request: GenerateRequest) -> Any:
        """The Serve call, under an internal request id of its own. A call made while serving an
        HTTP request inherits that request's internal id, and Serve's router files pending calls
        by it: the prompts of one batched completion would collide, all but one never routed.
        Runs in a copy of the context, so the HTTP request's own context is left as it was (its
        request id, which the logs show, is kept)."""
        current = serve_context._serve_request_context.get()
        if current is not None and current._internal_request_id:
            serve_context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=""))
        return self._generate.remote(request)

    async def replica_stats(self, timeout_s: float) -> list[dict]:
        return await self._broadcast("stats", timeout_s)

    async def replica_metrics(self, timeout_s: float) -> list[dict]:
        return await self._broadcast("metrics_snapshot", timeout_s)

    async def _broadcast(self, method: str, timeout_s: float) -> list[dict]:
        """`method` on every replica; a replica that fails or is still loading is left out."""
        try:
            broadcast = self._handle.broadcast(method)
            results = await broadcast.results_async(timeout_s=timeout_s, return_exceptions=True)
        except (TimeoutError, DeploymentUnavailableError):
            return []
        return [result for result in results if isinstance(result, dict)]


def served_model_name(config: LongctxConfig) -> str:
    return config.serve.model_name or Path(config.model.path).name


def http_app(backend: LLMBackend, config: LongctxConfig) -> FastAPI:
    """The OpenAI API of deployments/api.py over `backend`, as this config serves it."""
    service = OpenAIService(backend, PromptBuilder.from_config(config), config.serve, served_model_name(config))
    return build_api(service, load_api_keys(config.serve))


@serve.ingress()
class OpenAIIngress:
    def __init__(self, llm_server: DeploymentHandle, config: dict[str, Any]):
        self.config = load_config_dict(config)
        self.backend = HandleBackend(llm_server, self.config.serve.retry_after_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(self.backend, self.config)
