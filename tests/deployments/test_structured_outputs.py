"""Structured outputs and tool calling through the official openai client: response_format
json_schema (strict) and json_object, tools with tool_choice required / named / auto, in full
responses and streams; fields longctx cannot honour get a 400 naming them."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from deployments.api import OpenAIService, build_api
from deployments.prompts import PromptBuilder
from engine.outputs import CompletionDelta
from model_folder.tokenizer import Tokenizer

from .test_api_routes import ScriptedBackend

pytest.importorskip("xgrammar")

MODEL = "tiny"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 5}},
    "required": ["city", "days"],
}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"confirm": {"type": "boolean"}}, "required": ["confirm"]}}},
]  # fmt: skip


class Trip(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=9)


def _check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert value["city"] in ("Paris", "Rome") and 1 <= value["days"] <= 5


def test_json_schema_strict_is_followed_and_parsed(in_process_openai):
    schema_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    reply = in_process_openai.chat.completions.create(model=MODEL, messages=ASK, response_format=schema_format,
                                                      max_tokens=40, temperature=0)  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    _check_weather(reply.choices[0].message.content)
    parsed = in_process_openai.chat.completions.parse(model=MODEL, messages=ASK, response_format=Trip, max_tokens=40,
                                                      temperature=0.8, seed=3, n=3)  # fmt: skip
    assert all(isinstance(choice.message.parsed, Trip) for choice in parsed.choices)


def test_json_object_output_opens_an_object(in_process_openai):
    """A random-weight model wanders inside strings; still every output starts a JSON object."""
    reply = in_process_openai.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                                      max_tokens=8, n=4, temperature=1.0, seed=2)  # fmt: skip
    assert all(choice.message.content.startswith('{"') for choice in reply.choices)
    completion = in_process_openai.completions.create(model=MODEL, prompt="JSON:", max_tokens=8, temperature=0,
                                                      extra_body={"response_format": {"type": "json_object"}})
    assert completion.choices[0].text.startswith('{"')


def test_tool_choice_required_calls_a_tool_with_valid_arguments(in_process_openai):
    reply = in_process_openai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                      parallel_tool_calls=False, max_tokens=60, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if call.function.name == "get_weather":
        _check_weather(call.function.arguments)
    else:
        assert isinstance(json.loads(call.function.arguments)["confirm"], bool)
    chunks = list(in_process_openai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                            tool_choice="required", parallel_tool_calls=False,
                                                            max_tokens=60, temperature=0, stream=True))  # fmt: skip
    streamed = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [(call.function.name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_named_tool_streams_its_arguments(in_process_openai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = in_process_openai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                                      max_tokens=40, temperature=0)  # fmt: skip
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and reply.choices[0].finish_reason == "stop"
    _check_weather(call.function.arguments)
    chunks = list(in_process_openai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                                            max_tokens=40, temperature=0, stream=True))  # fmt: skip
    pieces = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert len(pieces) > 3  # the arguments arrive as they are generated
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert "".join(piece.function.arguments for piece in pieces) == call.function.arguments


def test_a_conversation_with_tool_results_renders(in_process_openai):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]  # fmt: skip
    reply = in_process_openai.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4)
    assert reply.usage.prompt_tokens > 100  # the tool signatures, the call and the result are in the prompt


# --- auto: the template's own format, read back (a scripted model writes it) ---------------------


def _scripted_client(prompts: PromptBuilder, make_config, texts: list[str]) -> TestClient:
    deltas = [CompletionDelta("r", 0, text, (7,), (), i == len(texts) - 1, "stop" if i == len(texts) - 1 else None,
                              3, i + 1, 0) for i, text in enumerate(texts)]  # fmt: skip
    config = make_config()
    return TestClient(build_api(OpenAIService(ScriptedBackend([deltas]), prompts, config.serve, MODEL)))


HERMES_REPLY = ["Let me check.", "\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Rome"}}',
                "\n</tool_call>"]  # fmt: skip


def test_auto_reads_hermes_tool_calls_whole_and_streamed(make_config):
    prompts = PromptBuilder.from_config(make_config())
    http = _scripted_client(prompts, make_config, HERMES_REPLY)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    message = reply.choices[0].message
    assert message.content == "Let me check." and reply.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Rome"})]
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True))
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert content == "Let me check.\n"  # the tag's first characters were held back, never sent as text
    calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]


def test_plain_text_with_tools_stays_content(make_config):
    prompts = PromptBuilder.from_config(make_config())
    http = _scripted_client(prompts, make_config, ["It is ", "sunny <tool"])
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "It is sunny <tool"
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- what cannot be honoured is a 400 naming it ---------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"logit_bias": {"five": 10}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"²": 1}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}]},
     "tools[0].function.parameters"),
])  # fmt: skip
def test_unsupported_requests_are_400_naming_the_field(in_process_http, extra, param):
    response = in_process_http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_tools_on_a_template_without_them_are_400(make_config, model_dir):
    tokenizer = Tokenizer.from_folder(model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    prompts = PromptBuilder(tokenizer, 4096, 1024)
    http = TestClient(build_api(OpenAIService(ScriptedBackend([]), prompts, make_config().serve, MODEL)))
    response = http.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    assert "does not define tools" in response.json()["error"]["message"]
