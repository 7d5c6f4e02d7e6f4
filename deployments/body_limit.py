"""An ASGI middleware that refuses request bodies over a size limit with 413.

Neither uvicorn nor Serve's proxy bounds a body; a million-token prompt is legitimately
several megabytes, a runaway client's body should not be buffered whole before it is refused.
The declared Content-Length is checked up front, a chunked body as it streams in.
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
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive):
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()  # raised inside the route: the app's error handlers answer
            return message

        return limited_receive

    def _error(self):
        return api_error(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")

    async def _refuse(self, send) -> None:
        body = json.dumps(self._error().error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
