"""A replica lost in the middle of a request (deployments/ingress.py, HandleBackend).

Before it answered (or when it answered only that its engine had stopped), the request is routed
again (nothing reached the client: the same request on another replica); after it started
answering, the request ends with a 503 `replica_lost` instead of a 500. The handle here is a
scripted stand-in for Serve's (its calls' replies and failures); test_serve_replica_loss.py kills
a real replica."""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError, ActorUnavailableError

from deployments.ingress import MAX_ROUTING_ATTEMPTS, HandleBackend
from deployments.messages import GenerateRequest, ServeError, replica_unavailable
from protocol.sampling_params import SamplingParams


class ScriptedResponse:
    """One routed call: yields its replies, then raises `error` if it has one."""

    def __init__(self, replies: list, error: BaseException | None = None):
        self.replies, self.error, self.cancelled = replies, error, False

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        for reply in self.replies:
            yield reply
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedHandle:
    """A Serve handle whose n-th `generate` call is the n-th scripted response."""

    def __init__(self, responses: list[ScriptedResponse]):
        self.responses, self.calls = list(responses), 0

    def options(self, **_):
        return self

    def remote(self, request):
        self.calls += 1
        return self.responses.pop(0)


def replies_of(handle: ScriptedHandle) -> list:
    backend = HandleBackend(handle, retry_after_s=3)
    request = GenerateRequest("r", [1, 2, 3], SamplingParams(max_tokens=4))

    async def collect():
        return [reply async for reply in backend.generate(request)]

    return asyncio.run(collect())


def test_a_replica_lost_before_answering_sends_the_request_to_another():
    answer = [["delta 1"], ["delta 2"]]
    handle = ScriptedHandle([ScriptedResponse([], ActorDiedError()),
                             ScriptedResponse([], ActorUnavailableError("node gone", None)),
                             ScriptedResponse(answer)])
    assert replies_of(handle) == answer
    assert handle.calls == 3


def test_a_replica_whose_engine_has_stopped_sends_the_request_to_another():
    """Its first (and only) reply says so: nothing reached the client, the request goes elsewhere."""
    answer = [["delta 1"]]
    handle = ScriptedHandle([ScriptedResponse([replica_unavailable("engine stopped", 3)]), ScriptedResponse(answer)])
    assert replies_of(handle) == answer
    assert handle.calls == 2


def test_a_replica_lost_after_answering_ends_the_request_with_a_503():
    handle = ScriptedHandle([ScriptedResponse([["delta 1"]], ActorDiedError()), ScriptedResponse([["never"]])])
    replies = replies_of(handle)
    assert replies[0] == ["delta 1"] and len(replies) == 2
    assert isinstance(replies[1], ServeError) and (replies[1].status, replies[1].code) == (503, "replica_lost")
    assert handle.calls == 1  # the client has part of an answer: a second replica would repeat it


def test_every_attempt_lost_is_a_503_with_retry_after():
    handle = ScriptedHandle([ScriptedResponse([], ActorDiedError()) for _ in range(MAX_ROUTING_ATTEMPTS)])
    (reply,) = replies_of(handle)
    assert isinstance(reply, ServeError) and (reply.status, reply.code, reply.retry_after_s) == (503, "replica_lost", 3)
    assert handle.calls == MAX_ROUTING_ATTEMPTS


def test_other_errors_are_not_retried():
    handle = ScriptedHandle([ScriptedResponse([], RuntimeError("a bug")), ScriptedResponse([["never"]])])
    try:
        replies_of(handle)
    except RuntimeError as error:
        assert str(error) == "a bug"
    else:
        raise AssertionError("a non-replica error was swallowed")
    assert handle.calls == 1
