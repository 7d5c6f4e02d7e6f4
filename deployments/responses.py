"""Engine deltas -> OpenAI response bodies and stream chunks, as plain dicts (json.dumps is the
hot path when streaming: one chunk per token per client).

`CompletionFormat` and `ChatFormat` differ only in object names, where the text goes (`text`
vs `delta` / `message`) and the logprobs layout; usage and choice bookkeeping are shared.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.tool_calls import ToolCallStream, ToolPlan, call_entry, read_calls
from engine.outputs import CompletionDelta
from protocol.step import SampledToken

TokenText = Callable[[int], str]
JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) without its per-call setup


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: tuple[SampledToken, ...] | None = None
    num_tokens: int = 0
    finish_reason: str | None = None
    streamed: bool = False  # a chunk went out already (chat: only the first carries the role)


@dataclass(frozen=True)
class EchoedPrompt:
    """A completion prompt sent back before its output (`echo`)."""

    text: str
    token_ids: tuple[int, ...]


class Usage:
    """Token counts over every prompt of the request; choice i belongs to prompt i // n."""

    def __init__(self, n: int = 1, reports_cached_tokens: bool = True) -> None:
        self.n = n
        self.completion_tokens = 0
        self._prompt_tokens: dict[int, int] = {}
        self._cached_tokens: dict[int, int] = {}
        # cached tokens are counted always (metrics); told the client only when `reports_cached_tokens`
        self.reports_cached_tokens = reports_cached_tokens

    def absorb(self, delta: CompletionDelta) -> None:
        prompt = delta.index // self.n
        self._prompt_tokens[prompt] = delta.num_prompt_tokens
        self._cached_tokens[prompt] = max(self._cached_tokens.get(prompt, 0), delta.num_prefix_hit_tokens)
        self.completion_tokens += len(delta.token_ids)

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompt_tokens.values())

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached_tokens.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens if self.reports_cached_tokens else 0},
        }


class _Format:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, model: str, token_text: TokenText, n: int, num_prompts: int = 1,
                 reports_cached_tokens: bool = True):  # fmt: skip
        self.request_id = request_id
        self.model = model
        self.token_text = token_text
        self.created = int(time.time())
        self.usage = Usage(n, reports_cached_tokens)
        self.choices = [_Choice() for _ in range(n * num_prompts)]
        # A stream chunk is this request's fixed envelope around one choice: serialized once here,
        # so that each token costs the JSON of its choice alone.
        envelope = JSON.encode(self._envelope(self.chunk_object_name))
        self._event_head = f'data: {envelope[:-1]}, "choices": ['

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": object_name, "created": self.created, "model": self.model}

    def absorb(self, delta: CompletionDelta) -> None:
        """Keep a delta for the full (non-streamed) response."""
        self.usage.absorb(delta)
        choice = self.choices[delta.index]
        choice.text.append(delta.text)
        choice.logprobs.extend(delta.logprobs)
        choice.prompt_logprobs = choice.prompt_logprobs or delta.prompt_logprobs
        choice.num_tokens += len(delta.token_ids)
        choice.finish_reason = delta.finish_reason or choice.finish_reason

    def chunk(self, delta: CompletionDelta) -> dict[str, Any]:
        """One stream chunk for a delta; counts its tokens towards usage."""
        return {**self._envelope(self.chunk_object_name), "choices": [self._streamed_choice(delta)]}

    def chunk_event(self, delta: CompletionDelta) -> str:
        """`chunk(delta)` as one server-sent event, the same text `sse_event(chunk(delta))` gives."""
        return f"{self._event_head}{JSON.encode(self._streamed_choice(delta))}]}}\n\n"

    def _streamed_choice(self, delta: CompletionDelta) -> dict[str, Any]:
        self.usage.absorb(delta)
        choice = self.choices[delta.index]
        body = self._chunk_choice(delta, first=not choice.streamed)
        choice.streamed = True
        return body

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object_name), "choices": [], "usage": self.usage.to_dict()}

    def response(self) -> dict[str, Any]:
        choices = [self._full_choice(index, choice) for index, choice in enumerate(self.choices)]
        return {**self._envelope(self.object_name), "choices": choices, "usage": self.usage.to_dict()}

    def _chunk_choice(self, delta: CompletionDelta, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _full_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(_Format):
    """`echo`: each choice starts with its prompt (`echoed[i // n]`), and with `logprobs` its
    tokens' logprobs lead the choice's, the first prompt token's None (nothing precedes it)."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, request_id: str, model: str, token_text: TokenText, n: int,
                 echoed: list[EchoedPrompt] | None = None, num_prompts: int = 1,
                 reports_cached_tokens: bool = True):  # fmt: skip
        super().__init__(request_id, model, token_text, n, num_prompts, reports_cached_tokens)
        self.n = n
        self.echoed = echoed

    def _chunk_choice(self, delta: CompletionDelta, first: bool) -> dict[str, Any]:
        prompt_text, prompt_tokens = self._echo(delta.index, delta.prompt_logprobs) if first else ("", [])
        tokens = prompt_tokens + list(delta.logprobs)
        logprobs = self._logprobs(tokens) if tokens else None
        return {"index": delta.index, "text": prompt_text + delta.text, "logprobs": logprobs,
                "finish_reason": delta.finish_reason}  # fmt: skip

    def _full_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        prompt_text, prompt_tokens = self._echo(index, choice.prompt_logprobs)
        tokens = prompt_tokens + choice.logprobs
        logprobs = self._logprobs(tokens) if tokens else None
        return {"index": index, "text": prompt_text + "".join(choice.text), "logprobs": logprobs,
                "finish_reason": choice.finish_reason}  # fmt: skip

    def _echo(self, index: int, prompt_logprobs: tuple[SampledToken, ...] | None) -> tuple[str, list[SampledToken]]:
        if self.echoed is None:
            return "", []
        prompt = self.echoed[index // self.n]
        if prompt_logprobs is None:
            return prompt.text, []
        return prompt.text, [SampledToken(prompt.token_ids[0]), *prompt_logprobs]

    def _logprobs(self, tokens: list[SampledToken]) -> dict[str, Any]:
        texts = [self.token_text(token.token_id) for token in tokens]
        offsets, offset = [], 0
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [token.logprob for token in tokens],
            "top_logprobs": [self._top(token) for token in tokens],
            "text_offset": offsets,
        }

    def _top(self, token: SampledToken) -> dict[str, float] | None:
        if token.logprob is None:  # the first prompt token
            return None
        return {self.token_text(t): lp for t, lp in token.top_logprobs}


class ChatFormat(_Format):
    """With `tools` (deployments/tool_calls.py) the text is read for tool calls: whole in a full
    response, through one ToolCallStream per choice in a stream."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, token_text: TokenText, n: int, tools: ToolPlan | None = None,
                 reports_cached_tokens: bool = True):  # fmt: skip
        super().__init__(request_id, model, token_text, n, reports_cached_tokens=reports_cached_tokens)
        self.tools = tools
        self.tool_streams = [ToolCallStream(tools) for _ in self.choices] if tools is not None else []

    def _chunk_choice(self, delta: CompletionDelta, first: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant"} if first else {}
        finish_reason = delta.finish_reason
        if self.tools is None:
            message["content"] = delta.text
        else:
            stream = self.tool_streams[delta.index]
            _merge(message, stream.feed(delta.text))
            if delta.finished:
                _merge(message, stream.finish())
                finish_reason = _tool_finish_reason(self.tools, finish_reason, stream.num_calls)
            if "content" not in message and "tool_calls" not in message:
                message["content"] = ""
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs else None
        return {"index": delta.index, "delta": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def _full_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        text, finish_reason = "".join(choice.text), choice.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tools is not None:
            content, calls = read_calls(self.tools, text)
            message["content"] = content
            if calls:
                message["tool_calls"] = [call_entry(i, name, arguments) for i, (name, arguments) in enumerate(calls)]
                for call in message["tool_calls"]:
                    del call["index"]  # only stream deltas carry an index
            finish_reason = _tool_finish_reason(self.tools, finish_reason, len(calls))
        logprobs = self._logprobs(choice.logprobs) if choice.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def _logprobs(self, tokens: list[SampledToken] | tuple[SampledToken, ...]) -> dict[str, Any]:
        return {"content": [self._entry(t.token_id, t.logprob, t.top_logprobs) for t in tokens]}

    def _entry(self, token_id: int, logprob: float | None, top=None) -> dict[str, Any]:
        text = self.token_text(token_id)
        entry = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        if top is not None:
            entry["top_logprobs"] = [self._entry(t, lp) for t, lp in top]
        return entry


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {JSON.encode(payload)}\n\n"


def _merge(message: dict[str, Any], part: dict[str, Any]) -> None:
    """Add a ToolCallStream delta to a message delta; content pieces join."""
    for key, value in part.items():
        message[key] = message[key] + value if key in message else value


def _tool_finish_reason(tools: ToolPlan, finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI's: `tool_calls` when the model chose to call; a function named by tool_choice ends with `stop`."""
    if num_calls and finish_reason == "stop" and tools.reader != "named":
        return "tool_calls"
    return finish_reason
