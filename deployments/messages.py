"""What the ingress sends to an LLM server replica and what comes back, through Ray Serve.

The ingress tokenizes, so a request carries token ids: the router hashes them for prefix
affinity and the replica counts them against its queue bound without tokenizing again.
A reply stream is a sequence of `list[CompletionDelta]` (every delta the engine had ready,
so that a busy replica sends one Ray message per step, not one per token) or, in place of
deltas, one `ServeError` that ends the stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: Sequence[int]  # array("q") from the API's prompt check (protocol/token_ids.py)
    params: SamplingParams
    cache_salt: str | None = None
    # No max_tokens from the client (chat): the replica lowers the default in params to the room
    # its context and KV cache leave after the prompt; only it knows its KV capacity.
    fill_max_tokens: bool = False


REPLICA_UNAVAILABLE = "replica_unavailable"


@dataclass(frozen=True)
class ServeError:
    """An error as OpenAI's API reports it; the ingress turns it into the HTTP response."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ServeError:
    return ServeError(400, message, "invalid_request_error", param, code)


def overloaded(message: str, retry_after_s: int) -> ServeError:
    return ServeError(429, message, "rate_limit_error", None, "server_overloaded", retry_after_s)


def replica_unavailable(message: str, retry_after_s: int) -> ServeError:
    """This replica cannot serve any request (its engine has stopped); another one can: the
    ingress routes a request answered so, and nothing else yet, again (deployments/ingress.py)."""
    return ServeError(503, message, "service_unavailable_error", None, REPLICA_UNAVAILABLE, retry_after_s)


def engine_failure(message: str) -> ServeError:
    return ServeError(500, message, "server_error", None, "engine_error")


def request_failure(message: str) -> ServeError:
    """This request failed inside the engine; the engine and every other request went on."""
    return ServeError(500, message, "server_error", None, "request_failed")
