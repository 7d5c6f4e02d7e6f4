"""OpenAI's request bodies for /v1/completions and /v1/chat/completions, as pydantic models.

Only shapes and types are checked here (FastAPI turns a mismatch into a 400 naming the field),
strictly: "10" is not 10 and "yes" is not true, NaN and infinities are no numbers, and a string
with a lone surrogate (a JSON escape such as "\\udfff", which no UTF-8 can carry) is refused.
Ranges that hold for every model are checked once, by `SamplingParams`; the bounds of the served
model and config (context, vocabulary, n), by deployments/request_limits.py. Unknown fields are
ignored, as vLLM does, so that clients sending newer OpenAI fields (`user`, `metadata`, ...) keep
working. Sampling extras beyond OpenAI's names use vLLM's names: top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, cache_salt, truncate_prompt_tokens.
"""

from __future__ import annotations

import json
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


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(RequestBody):
    include_usage: bool = False


class _SamplingFields(RequestBody):
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
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias from -100 to 100, added to its logit before sampling.")
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="Token ids within the vocabulary.")
    skip_special_tokens: bool = True
    cache_salt: Text | None = Field(None, description="Tenants with different salts never share KV blocks.")
    truncate_prompt_tokens: int | None = Field(
        None, description="Keep only the prompt's last k tokens (after the chat template); -1: as many as the "
        "context holds with room for one output token.")


class JSONSchemaFormat(RequestBody):
    name: str = "response"
    description: str | None = None
    # `schema` would shadow pydantic's BaseModel.schema(): the attribute is json_schema.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(RequestBody):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(RequestBody):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestBody):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class _StructuredFields(RequestBody):
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields, _StructuredFields):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="Text or token ids, or a list of prompts (each one's choices, prompt-major).")
    logprobs: int | None = None  # the sampled token's logprob plus the top k
    echo: bool = False  # the prompt leads each choice; with logprobs, its tokens are scored
    best_of: int | None = Field(None, description="Only equal to n; at most the server's serve.max_n.")
    suffix: Text | None = None


class ContentPart(RequestBody):
    type: Text
    text: Text | None = None


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one

    def template_message(self) -> dict[str, Any]:
        """As chat templates expect it: `content` a plain string, tool-call arguments a mapping
        (templates render them with `tojson`)."""
        message: dict[str, Any] = {"role": self.role, "content": _text(self.content)}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [_template_tool_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields, _StructuredFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="Wins over max_tokens; the same bound.")
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Declared so that sending one is a 400 naming it (deployments/structured_outputs.py).
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.template_message() for message in self.messages]


def _template_tool_call(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments  # as sent; a template may still render it
    return {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": arguments}}


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if any(part.type != "text" for part in content):
        raise InvalidParameterError("messages", "only text content parts are supported")
    return "".join(part.text or "" for part in content)
