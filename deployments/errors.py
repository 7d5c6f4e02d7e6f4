"""Every error the HTTP API returns, in OpenAI's shape: {"error": {message, type, param, code}}.

FastAPI's own answers are rewritten too: a body that fails validation (FastAPI's 422) or is
not JSON becomes a 400 naming the field, an unknown route a 404, an unexpected exception a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from deployments.messages import ServeError, invalid_request
from protocol.sampling_params import InvalidParameterError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """Raised anywhere in a request's handling; answered with `error` as is."""

    def __init__(self, error: ServeError):
        super().__init__(error.message)
        self.error = error


def api_error(status: int, message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(ServeError(status, message, _TYPES.get(status, "server_error"), param, code))


def error_response(error: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def parameter_error(error: InvalidParameterError) -> ServeError:
    return invalid_request(str(error), error.param, getattr(error, "code", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(InvalidParameterError, _parameter_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error.error)


async def _parameter_error(_: Request, error: InvalidParameterError) -> JSONResponse:
    return error_response(parameter_error(error))


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = error.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(invalid_request(f"the request body is not valid JSON: {first.get('msg', '')}"))
    location = [part for part in first.get("loc", ()) if part != "body"]
    if not location and not _says_json(request.headers.get("content-type")):
        # FastAPI reads a body as JSON only when its Content-Type says so: `curl -d` sends a JSON
        # object as a form, which would otherwise be refused as "not a JSON object".
        sent = request.headers.get("content-type") or "none"
        return error_response(invalid_request(f"the request body must be JSON sent with Content-Type: "
                                              f"application/json; this request's Content-Type is {sent!r}"))
    if not location:
        return error_response(invalid_request(f"the request body must be a JSON object: {first.get('msg', '')}"))
    # `param` is the top-level field, as OpenAI reports it; the message has the full path. A
    # union (prompt: str | list[int] | ...) fails once per branch: their messages are joined.
    param = str(location[0])
    same_field = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == location[:1]]
    reasons = "; ".join(dict.fromkeys(e.get("msg", "invalid value") for e in same_field[:4]))
    path = ".".join(str(part) for part in location if not _is_union_tag(part))
    return error_response(invalid_request(f"{path}: {reasons}", param))


def _says_json(content_type: str | None) -> bool:
    """application/json, or a +json type, with any parameters (FastAPI's own rule)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _is_union_tag(part) -> bool:
    """pydantic names the union branch that failed inside `loc` ('str', 'list[int]')."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    status = error.status_code
    return error_response(ServeError(status, str(error.detail), _TYPES.get(status, "invalid_request_error")))


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path, exc_info=error)
    return error_response(ServeError(500, f"internal error: {error!r}", "server_error"))
