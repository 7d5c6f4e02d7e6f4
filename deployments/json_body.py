"""Request bodies parsed by pydantic-core's JSON parser instead of the json module.

A long prompt sent as token ids is large JSON (32K tokens: ~220 KB), parsed on the replica's
event loop, which shares the GIL with the engine thread: ~4 ms a request with `json.loads`
against ~1.5 ms with `pydantic_core.from_json` on the CPU machine (docs/benchmarks.md, session 10
of the serve-overhead branch). A body that parser refuses goes through `json.loads` as before,
so malformed JSON raises the same `json.JSONDecodeError`, which FastAPI answers as it always did.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class FastJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError:  # malformed, or JSON only the json module reads (UTF-16, lone surrogates)
                self._json = json.loads(body)
        return self._json


class FastJSONRoute(APIRoute):
    """An APIRoute whose handler reads the body through FastJSONRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            # The same scope, receive (size-limited by BodySizeLimit) and send; Starlette keeps send private.
            return await handler(FastJSONRequest(request.scope, request.receive, request._send))

        return route_handler
