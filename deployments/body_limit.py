"""An ASGI middleware that refuses request bodies over a size limit with 413.

Neither uvicorn nor Serve's proxy bounds a body; a million-token prompt is legitimately
several megabytes, a runaway client's body should not be buffered whole before it is refused.
The declared Content-Length is checked up front; any other body (chunked) is read here as it
streams in, up to the limit, and refused by this middleware the moment it passes it: raised
inside the app instead, FastAPI would report a failed read as a 400 "error parsing the body".
A body within the limit is handed to the app as read (FastAPI buffers it whole anyway).
"""

from __future__ import annotations

import json

from deployments.errors import api_error


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        messages = await self._read_within_limit(receive)
        if messages is None:
            await self._refuse(send)
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _read_within_limit(self, receive) -> list[dict] | None:
        """The body's messages, or None once they pass the limit (the rest is left unread)."""
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # a disconnect: the app sees it as it would have
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    async def _refuse(self, send) -> None:
        error = api_error(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")
        body = json.dumps(error.error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # the unread rest of the body must not be parsed as a request
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[dict], receive):
    """`receive` for the app: the messages already read, then the connection's own (a disconnect)."""
    pending = list(messages)

    async def replay() -> dict:
        return pending.pop(0) if pending else await receive()

    return replay
