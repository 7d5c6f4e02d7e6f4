"""The OpenAI-compatible HTTP API as a FastAPI app over an `LLMBackend`.

Built per ingress replica by deployments/ingress.py (backend: Serve handles), and in tests and
benches over an in-process LLM server, so every route runs without Ray too.

A streamed response starts when the first token (or an error) arrives: an invalid request or
a full queue still gets its own HTTP status rather than a 200 stream that fails. Clients of
million-token prompts should allow for a long wait before the headers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import contextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from cluster.config import ServeSettings
from deployments.batched_prompts import merged_replies, requests_per_prompt
from deployments.body_limit import BodySizeLimit
from deployments.disconnects import unless_disconnected
from deployments.errors import APIError, api_error, install_error_handlers
from deployments.generation import (
    CLIENT_CLOSED_REQUEST,
    LLMBackend,
    ReplyStream,
    RequestTimer,
)
from deployments.json_body import FastJSONRoute
from deployments.messages import GenerateRequest
from deployments.metrics import ServingMetrics
from deployments.openai_api import ChatCompletionRequest, CompletionRequest
from deployments.openapi_docs import (
    API_VERSION,
    GENERATION_RESPONSES,
    GUARDED_RESPONSES,
    PROBE_RESPONSES,
    error_responses,
    install_openapi,
)
from deployments.prompts import PromptBuilder, off_loop_if_long, split_prompts
from deployments.request_limits import RequestLimits
from deployments.responses import ChatFormat, CompletionFormat, EchoedPrompt, _Format, sse_event
from deployments.sampling import chat_params, completion_params
from deployments.tenants import bearer_auth, no_auth, tenant_cache_salt
from deployments.tokenize_api import TokenizeService, install_tokenize_routes
from deployments.tool_calls import parser_for, plan_tools
from engine.outputs import CompletionDelta
from protocol.sampling_params import InvalidParameterError

STATS_TIMEOUT_S = 5.0  # /health and /metrics ask every replica; a loading one must not hang a probe


class OpenAIService:
    def __init__(self, backend: LLMBackend, prompts: PromptBuilder, settings: ServeSettings, model_name: str):
        self.backend = backend
        self.prompts = prompts
        self.settings = settings
        self.model_name = model_name
        self.metrics = ServingMetrics()
        self.created = int(time.time())
        self.tool_parser = parser_for(settings.tool_call_parser, prompts.tokenizer.chat_template)
        self.limits = RequestLimits(prompts.max_model_len, prompts.vocab_size, settings.max_n,
                                    settings.default_chat_max_tokens)

    # --- probes and listing --------------------------------------------------------------
    async def health(self) -> JSONResponse:
        """200 once a replica has its model loaded and its engine running; 503 before."""
        stats = await self.backend.replica_stats(STATS_TIMEOUT_S)
        alive = [s for s in stats if s.get("alive")]
        body = {"status": "ok" if alive else "loading", "replicas": len(alive)}
        redis = [s["kv_redis_up"] for s in alive if s.get("kv_redis_up") is not None]
        if redis:  # a cache: serving goes on without it, so it is reported, not a failure
            body["kv_redis"] = "up" if all(redis) else "down"
        return JSONResponse(body, status_code=200 if alive else 503)

    async def metrics_text(self) -> Response:
        snapshots = await self.backend.replica_metrics(STATS_TIMEOUT_S)
        return Response(self.metrics.exposition(snapshots), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str) -> dict:
        """GET /v1/models/{model} (the openai client's `models.retrieve`)."""
        self.check_model(model)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "longctx",
                "max_model_len": self.prompts.max_model_len}  # fmt: skip

    # --- generation ----------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, tenant: str | None = None) -> Response:
        timer = RequestTimer(self.metrics, "completions")
        with _counted_on_error(timer):
            self.check_model(body.model)
            params = completion_params(body, self.limits)  # every field checked before the prompt is read
            prompts = await off_loop_if_long(self.prompts.completion, _num_chars(body.prompt), body.prompt,
                                             body.truncate_prompt_tokens)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            generates = requests_per_prompt(request_id, prompts, params, self._cache_salt(tenant, body.cache_salt))
            echoed = self._echoed(body, prompts) if body.echo else None
            output = CompletionFormat(request_id, self.model_name, self.prompts.token_text, body.n, echoed, len(prompts),
                                      self._reports_cached_tokens(tenant))  # fmt: skip
        return await self._respond(timer, generates, output, body.stream, _include_usage(body))

    def _echoed(self, body: CompletionRequest, prompts: list[list[int]]) -> list[EchoedPrompt]:
        texts = split_prompts(body.prompt)
        as_sent = body.truncate_prompt_tokens is None  # else the echo is what was kept
        return [EchoedPrompt(text if isinstance(text, str) and as_sent else
                             self.prompts.prompt_text(ids, body.skip_special_tokens),
                             tuple(ids)) for text, ids in zip(texts, prompts)]  # fmt: skip

    async def chat_completions(self, body: ChatCompletionRequest, tenant: str | None = None) -> Response:
        timer = RequestTimer(self.metrics, "chat_completions")
        with _counted_on_error(timer):
            self.check_model(body.model)
            tools = plan_tools(body, self.prompts.template_defines_tools, self.tool_parser)
            params, fill = chat_params(body, self.limits, tools)  # every field checked before the prompt is read
            messages = body.template_messages()
            num_chars = sum(len(message["content"]) for message in messages)
            template_tools = tools.template_tools if tools else None
            token_ids = await off_loop_if_long(self.prompts.chat, num_chars, messages, template_tools,
                                               body.truncate_prompt_tokens)
            generate = GenerateRequest(f"chatcmpl-{uuid.uuid4().hex}", token_ids, params,
                                       self._cache_salt(tenant, body.cache_salt), fill)
            output = ChatFormat(generate.request_id, self.model_name, self.prompts.token_text, body.n, tools,
                                self._reports_cached_tokens(tenant))
        return await self._respond(timer, [generate], output, body.stream, _include_usage(body))

    def _cache_salt(self, tenant: str | None, cache_salt: str | None) -> str | None:
        """The tenant's own cache namespace (deployments/tenants.py), unless tenants share one."""
        return tenant_cache_salt(None if self.settings.tenants_share_cache else tenant, cache_salt)

    def _reports_cached_tokens(self, tenant: str | None) -> bool:
        """Not when tenants share a namespace: the hit may be on another tenant's prompt."""
        return tenant is None or not self.settings.tenants_share_cache

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise api_error(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                            "model", "model_not_found")  # fmt: skip

    async def _respond(self, timer: RequestTimer, generates: list[GenerateRequest], output: _Format, stream: bool,
                       include_usage: bool) -> Response:  # fmt: skip
        sources = [self.backend.generate(generate) for generate in generates]
        n = generates[0].params.n
        replies = ReplyStream(merged_replies(sources, n), self.settings.request_timeout_s)
        try:
            with _counted_on_error(timer):
                first = await replies.next_batch()
        except BaseException:
            await replies.close()
            raise
        if stream:
            events = _events(first, replies, output, timer, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _full_response(first, replies, output, timer)


@contextmanager
def _counted_on_error(timer: RequestTimer):
    """A request that fails here is counted with its status, then answered by the error handlers."""
    try:
        yield
    except BaseException as error:
        timer.finish(_status_of(error))
        raise


def _num_chars(prompt: str | list) -> int:
    """Characters of a text prompt or a list of texts; 0 for token ids, without visiting each id
    (a 32K-token prompt: ~2 ms a request on the event loop, session 10)."""
    if isinstance(prompt, str):
        return len(prompt)
    if prompt and isinstance(prompt[0], str):  # validated as list[str]: every element a text
        return sum(map(len, prompt))
    return 0


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _status_of(error: BaseException) -> int:
    if isinstance(error, APIError):
        return error.error.status
    if isinstance(error, InvalidParameterError):
        return 400
    return 500 if isinstance(error, Exception) else CLIENT_CLOSED_REQUEST


async def _batches(first: list[CompletionDelta] | None, replies: ReplyStream, timer: RequestTimer):
    batch = first
    while batch is not None:
        timer.on_deltas(batch)
        yield batch
        batch = await replies.next_batch()


async def _full_response(first, replies: ReplyStream, output: _Format, timer: RequestTimer) -> JSONResponse:
    status = 500
    try:
        async for batch in _batches(first, replies, timer):
            for delta in batch:
                output.absorb(delta)
        status = 200
    except BaseException as error:
        status = _status_of(error)
        raise
    finally:
        await replies.close()
        timer.finish(status, output.usage)
    return JSONResponse(output.response())


async def _events(first, replies: ReplyStream, output: _Format, timer: RequestTimer,
                  include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    status = CLIENT_CLOSED_REQUEST  # unless the loop below ends
    try:
        async for batch in _batches(first, replies, timer):
            yield "".join(output.chunk_event(delta) for delta in batch)
        if include_usage:
            yield sse_event(output.usage_chunk())
        status = 200
    except APIError as error:  # headers are gone: the error travels as an event, as OpenAI's does
        status = error.error.status
        yield sse_event(error.error.body())
    finally:
        await replies.close()
        timer.finish(status, output.usage)
    yield "data: [DONE]\n\n"


def build_api(service: OpenAIService, api_keys: dict[str, str] | None = None) -> FastAPI:
    """The app; `api_keys` (key -> tenant, deployments/tenants.py) guards /v1/*, None leaves it open."""
    app = FastAPI(title="longctx", version=API_VERSION, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="OpenAI-compatible completions and chat completions over long contexts.")
    app.router.route_class = FastJSONRoute  # every route added below parses its JSON body faster
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=service.settings.max_request_body_bytes)
    caller = bearer_auth(api_keys) if api_keys else no_auth

    # A client that leaves before its response (or, streaming, before its first token) stops its
    # request: deployments/disconnects.py.
    async def completions(request: Request, body: CompletionRequest,
                          tenant: str | None = Depends(caller)) -> Response:  # fmt: skip
        return await unless_disconnected(request, service.completions(body, tenant))

    async def chat_completions(request: Request, body: ChatCompletionRequest,
                               tenant: str | None = Depends(caller)) -> Response:  # fmt: skip
        return await unless_disconnected(request, service.chat_completions(body, tenant))

    # Probes stay open: a kubelet or Prometheus carries no API key.
    app.add_api_route("/health", service.health, methods=["GET"], responses=PROBE_RESPONSES)
    app.add_api_route("/metrics", service.metrics_text, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route("/v1/models", service.models, methods=["GET"], dependencies=[Depends(caller)],
                      responses=GUARDED_RESPONSES)
    app.add_api_route("/v1/models/{model}", service.model, methods=["GET"], dependencies=[Depends(caller)],
                      responses=error_responses(401, 404), summary="The served model's card")
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses=GENERATION_RESPONSES,
                      summary="Complete a prompt (text or token ids)")
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=GENERATION_RESPONSES,
                      summary="Answer a chat")
    install_tokenize_routes(app, TokenizeService(service.prompts, service.check_model), [Depends(caller)],
                            error_responses(400, 401, 404, 413))
    return app
