"""OpenAI's request bodies for /v1/completions and /v1/chat/completions, as pydantic models.

Only shapes and types are checked here (FastAPI turns a mismatch into a 400 naming the field),
strictly: "10" is not 10 and "yes" is not true, NaN and infinities are no numbers, and a string
with a lone surrogate (a JSON escape such as "\\udfff", which no UTF-8 can carry) is refused.
Ranges that hold for every model are checked once, by `SamplingParams`; the bounds of the served
model and config (context, vocabulary, n), by deployments/request_limits.py. Unknown fields are
ignored, as vLLM does, so that clients sending newer OpenAI fields (`user`, `metadata`, ...) keep
working. Sampling extras beyond OpenAI's names use vLLM's names: top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, cache_salt.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from protocol.sampling_params import InvalidParameterError

# Per-token work in the engine grows with these (stop strings are matched after every token).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


def _utf8_only(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8_only)]
StopString = Annotated[Text, Field(max_length=MAX_STOP_STRING_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: Text | None = None
    max_tokens: int | None = Field(None, description="At most the model's context length (/v1/models max_model_len).")
    temperature: float | None = None  # OpenAI's default is 1.0
    top_p: float | None = None
    n: int = Field(1, description="Choices to generate; at most the server's serve.max_n.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="64 bits.")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = Field(None, description="-1 or 0: off; at most the vocabulary size.")
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="Token ids within the vocabulary.")
    skip_special_tokens: bool = True
    cache_salt: Text | None = Field(None, description="Tenants with different salts never share KV blocks.")


class CompletionRequest(_SamplingFields):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="Text or token ids; one prompt per request.")
    logprobs: int | None = None  # the sampled token's logprob plus the top k
    echo: bool = False
    best_of: int | None = Field(None, description="Only equal to n; at most the server's serve.max_n.")
    suffix: Text | None = None


class ContentPart(_Body):
    type: Text
    text: Text | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="Wins over max_tokens; the same bound.")
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
