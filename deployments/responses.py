"""Engine deltas -> OpenAI response bodies and stream chunks, as plain dicts (json.dumps is the
hot path when streaming: one chunk per token per client).

`CompletionFormat` and `ChatFormat` differ only in object names, where the text goes (`text`
vs `delta` / `message`) and the logprobs layout; usage and choice bookkeeping are shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import CompletionDelta
from protocol.step import SampledToken

TokenText = Callable[[int], str]


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    streamed: bool = False  # a chunk went out already (chat: only the first carries the role)


class Usage:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0

    def absorb(self, delta: CompletionDelta) -> None:
        self.prompt_tokens = delta.num_prompt_tokens
        self.completion_tokens += len(delta.token_ids)
        self.cached_tokens = max(self.cached_tokens, delta.num_prefix_hit_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class _Format:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, model: str, token_text: TokenText, n: int):
        self.request_id = request_id
        self.model = model
        self.token_text = token_text
        self.created = int(time.time())
        self.usage = Usage()
        self.choices = [_Choice() for _ in range(n)]

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": object_name, "created": self.created, "model": self.model}

    def absorb(self, delta: CompletionDelta) -> None:
        """Keep a delta for the full (non-streamed) response."""
        self.usage.absorb(delta)
        choice = self.choices[delta.index]
        choice.text.append(delta.text)
        choice.logprobs.extend(delta.logprobs)
        choice.num_tokens += len(delta.token_ids)
        choice.finish_reason = delta.finish_reason or choice.finish_reason

    def chunk(self, delta: CompletionDelta) -> dict[str, Any]:
        """One stream chunk for a delta; counts its tokens towards usage."""
        self.usage.absorb(delta)
        choice = self.choices[delta.index]
        body = self._chunk_choice(delta, first=not choice.streamed)
        choice.streamed = True
        return {**self._envelope(self.chunk_object_name), "choices": [body]}

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
    object_name = chunk_object_name = "text_completion"

    def _chunk_choice(self, delta: CompletionDelta, first: bool) -> dict[str, Any]:
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs else None
        return {"index": delta.index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    def _full_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        logprobs = self._logprobs(choice.logprobs) if choice.logprobs else None
        return {"index": index, "text": "".join(choice.text), "logprobs": logprobs, "finish_reason": choice.finish_reason}

    def _logprobs(self, tokens: list[SampledToken] | tuple[SampledToken, ...]) -> dict[str, Any]:
        texts = [self.token_text(token.token_id) for token in tokens]
        offsets, offset = [], 0
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [token.logprob for token in tokens],
            "top_logprobs": [{self.token_text(t): lp for t, lp in token.top_logprobs} for token in tokens],
            "text_offset": offsets,
        }


class ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _chunk_choice(self, delta: CompletionDelta, first: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs else None
        return {"index": delta.index, "delta": message, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    def _full_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(choice.text)}
        logprobs = self._logprobs(choice.logprobs) if choice.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    def _logprobs(self, tokens: list[SampledToken] | tuple[SampledToken, ...]) -> dict[str, Any]:
        return {"content": [self._entry(t.token_id, t.logprob, t.top_logprobs) for t in tokens]}

    def _entry(self, token_id: int, logprob: float | None, top=None) -> dict[str, Any]:
        text = self.token_text(token_id)
        entry = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        if top is not None:
            entry["top_logprobs"] = [self._entry(t, lp) for t, lp in top]
        return entry
