"""What /openapi.json says beyond the request models that FastAPI reads from the routes: the
error shape of every failure, and the two forms of a generation's 200 (a JSON body, or server-sent
events when `stream` is true).

FastAPI documents a 422 for every route with a body; this API answers a body that fails
validation with a 400 in OpenAI's error shape instead (deployments/errors.py), so the 422 is
taken out of the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

API_VERSION = "1"

_MEANINGS = {
    400: "Invalid request: a field of the wrong type or out of range, or a prompt beyond the context.",
    401: "Missing or invalid API key.",
    404: "No such model.",
    413: "The request body is larger than serve.max_request_body_bytes.",
    429: "Every queue is full; retry after the Retry-After header's seconds.",
    500: "This request failed in the engine (code request_failed) or the engine stopped (engine_error).",
    503: "No model server is available.",
    504: "The request did not finish within serve.request_timeout_s.",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": _MEANINGS[status]} for status in statuses}


GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The completion as one JSON object; with `stream`, server-sent events of chunks "
                         "ending with `data: [DONE]` (an error after the first chunk comes as an event).",
          "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 413, 429, 500, 503, 504),
}
GUARDED_RESPONSES = error_responses(401)
PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"description": "No replica has its model loaded and its engine running yet."}}


def install_openapi(app: FastAPI) -> None:
    """/openapi.json from the routes, without FastAPI's 422s (this API answers 400)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
