"""Stream chunks as server-sent events: `chunk_event` serializes the request's envelope once and
each delta's choice alone; its text must be exactly what serializing the whole chunk gives."""

from __future__ import annotations

import json

from deployments.responses import ChatFormat, CompletionFormat, sse_event
from engine.outputs import CompletionDelta
from protocol.step import SampledToken


def _delta(index: int, text: str, token_id: int, finish_reason: str | None = None) -> CompletionDelta:
    return CompletionDelta("req", index, text, (token_id,), (SampledToken(token_id, -0.5, ((token_id, -0.5),)),),
                           finish_reason is not None, finish_reason, 7, 1, 0)


def _formats(make):
    """Two formats of one request (the same creation second): one for each way of serializing."""
    by_event, by_chunk = make(), make()
    by_chunk.created = by_event.created
    return by_event, by_chunk


def test_a_completion_event_is_the_serialized_chunk_text_for_text_unicode_and_logprobs():
    by_event, by_chunk = _formats(lambda: CompletionFormat("cmpl-1", "tiny", lambda t: f"<{t}>", n=2))
    deltas = [_delta(0, "The", 5), _delta(1, ' "東京"\n', 6), _delta(0, "", 7, "length"), _delta(1, "é", 8, "stop")]
    for delta in deltas:
        event = by_event.chunk_event(delta)
        assert event == f"data: {json.dumps(by_chunk.chunk(delta), ensure_ascii=False)}\n\n"
    assert json.loads(event.removeprefix("data: "))["choices"][0] == {
        "index": 1, "text": "é", "finish_reason": "stop",
        "logprobs": {"tokens": ["<8>"], "token_logprobs": [-0.5], "top_logprobs": [{"<8>": -0.5}], "text_offset": [0]}}
    assert by_event.usage.to_dict() == by_chunk.usage.to_dict()
    assert by_event.usage.completion_tokens == 4


def test_a_chat_event_carries_the_role_first_and_matches_the_serialized_chunk():
    by_event, by_chunk = _formats(lambda: ChatFormat("chatcmpl-1", "tiny", lambda t: f"<{t}>", n=1))
    events = [by_event.chunk_event(delta) for delta in (_delta(0, "Hi", 5), _delta(0, "!", 6, "stop"))]
    chunks = [by_chunk.chunk(delta) for delta in (_delta(0, "Hi", 5), _delta(0, "!", 6, "stop"))]
    assert events == [f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks]
    first, last = (json.loads(event.removeprefix("data: ")) for event in events)
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-1"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    assert (last["choices"][0]["delta"], last["choices"][0]["finish_reason"]) == ({"content": "!"}, "stop")
    assert sse_event({"a": "東"}) == 'data: {"a": "東"}\n\n'
