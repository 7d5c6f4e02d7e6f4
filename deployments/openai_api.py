"""OpenAI's request bodies for /v1/completions and /v1/chat/completions, as pydantic models.

Only shapes and types are checked here (FastAPI turns a mismatch into a 400 naming the field);
ranges are checked once, by `SamplingParams`. Unknown fields are ignored, as vLLM does, so that
clients sending newer OpenAI fields (`user`, `metadata`, ...) keep working.
Sampling extras beyond OpenAI's names use vLLM's names: top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, cache_salt.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.sampling_params import InvalidParameterError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1.0
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, description="Tenants with different salts never share KV blocks.")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # the sampled token's logprob plus the top k
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them: `content` a plain string."""
        return [{"role": message.role, "content": _text(message.content)} for message in self.messages]


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if any(part.type != "text" for part in content):
        raise InvalidParameterError("messages", "only text content parts are supported")
    return "".join(part.text or "" for part in content)
