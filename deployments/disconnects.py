"""A generation request whose client has gone stops: its engine request is aborted and its KV
blocks freed, whether it streams or not.

A streamed response notices the disconnect itself once it streams (Starlette's
StreamingResponse listens for it). Before that, while the prompt is prefilled (up to ~30 s for a
1M-token prompt on one GPU), and for the whole of a non-streamed request, the handler only waits
on the engine and nothing reads the connection: a client that gave up (a timeout, then a retry)
would leave its request computing, and a retry would compute it again. So the handler runs beside
a watcher of the connection; whichever ends first cancels the other (the handler's cancellation
closes its replies, which aborts the engine request: deployments/api.py `_respond`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request, Response

from deployments.generation import CLIENT_CLOSED_REQUEST

T = TypeVar("T")


async def until_disconnected(request: Request) -> None:
    """Returns once the client has closed the connection. Called after the body is read: what the
    connection says next is its disconnect (messages of another kind are skipped)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, handling: Awaitable[T]) -> T | Response:
    """`handling`'s result, or, when the client leaves first, `handling` cancelled and a 499 for
    the access log (nobody reads it). The watcher is stopped before a result is returned: a
    streamed response listens to the connection itself from then on."""
    handler = asyncio.ensure_future(handling)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled from outside (Ray Serve's own disconnect)
        watcher.cancel()
        if not handler.done():
            handler.cancel()
    if handler.done() and not handler.cancelled():
        return handler.result()
    await asyncio.gather(handler, return_exceptions=True)  # its cleanup (the abort) runs to its end
    return Response(status_code=CLIENT_CLOSED_REQUEST)
