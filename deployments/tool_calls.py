"""Tool calling on /v1/chat/completions: what `tools` and `tool_choice` ask of the prompt, the
grammar and the output, and reading `tool_calls` back out of the model's text.

    tool_choice   template sees tools   output grammar                         output read as
    none          no                    -                                      text
    auto          yes                   - (response_format's, if any)          the template's format (below)
    required      yes                   a JSON array of {name, arguments}      that array
    {function}    yes                   the function's parameters schema       its arguments

`auto` reads the format the chat template asks the model to write (serve.tool_call_parser):
`hermes` (Qwen 2.5, Hermes: `<tool_call>{"name": .., "arguments": ..}</tool_call>`) or
`llama3_json` (Llama 3.1: a bare `{"name": .., "parameters": ..}`, `;` between calls).
Streams send text as content while it cannot be the start of a call, and the calls when the
choice ends; a named function's arguments stream as they are generated.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from deployments.openai_api import ChatCompletionRequest, Tool
from deployments.structured_outputs import check_schema, json_schema_output
from protocol.sampling_params import InvalidParameterError, StructuredOutput

ParserName = Literal["hermes", "llama3_json"]
OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    template_tools: list[dict[str, Any]] | None  # what the chat template renders; None: no tools
    constraint: StructuredOutput | None
    reader: Literal["named", "required", "hermes", "llama3_json"]
    function_name: str | None = None  # the named function


def parser_for(setting: str, chat_template: str | None) -> ParserName:
    """serve.tool_call_parser; `auto` reads the template: Hermes tags or Llama 3.1's bare JSON."""
    if setting != "auto":
        return setting  # type: ignore[return-value]
    return "hermes" if chat_template and "<tool_call>" in chat_template else "llama3_json"


def plan_tools(request: ChatCompletionRequest, template_defines_tools: bool, parser: ParserName) -> ToolPlan | None:
    """None when the request involves no tools (none sent, or tool_choice none)."""
    if request.tool_choice is not None and not request.tools:
        raise InvalidParameterError("tool_choice", "tool_choice needs tools")
    if not request.tools or request.tool_choice == "none":
        return None
    if not template_defines_tools:
        raise InvalidParameterError("tools", "this model's chat template does not define tools")
    for index, tool in enumerate(request.tools):
        check_schema(tool.function.parameters or OBJECT_SCHEMA, f"tools[{index}].function.parameters")
    template_tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    choice = request.tool_choice or "auto"
    if choice == "auto":
        return ToolPlan(template_tools, None, parser)
    if choice == "required":
        schema = _calls_schema(request.tools, _arguments_key(parser), request.parallel_tool_calls)
        return ToolPlan(template_tools, json_schema_output(schema, "tools", strict=True), "required")
    tool = _named(request.tools, choice.function.name)
    parameters = tool.function.parameters or OBJECT_SCHEMA
    return ToolPlan(template_tools, json_schema_output(parameters, "tools", strict=True), "named", tool.function.name)


def _named(tools: list[Tool], name: str) -> Tool:
    for tool in tools:
        if tool.function.name == name:
            return tool
    raise InvalidParameterError("tool_choice", f"no tool named {name!r} among the tools")


def _arguments_key(parser: ParserName) -> str:
    return "parameters" if parser == "llama3_json" else "arguments"


def _calls_schema(tools: list[Tool], arguments_key: str, parallel: bool) -> dict[str, Any]:
    one_call = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, arguments_key: tool.function.parameters or OBJECT_SCHEMA},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    } for tool in tools]}  # fmt: skip
    return {"type": "array", "items": one_call, "minItems": 1, **({} if parallel else {"maxItems": 1})}


# --- reading calls out of the text ------------------------------------------------------------------

Call = tuple[str, str]  # (function name, arguments as JSON text)
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def read_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[Call]]:
    """(content, calls) of a whole output; text that holds no valid call stays content."""
    if plan.reader == "named":
        return None, [(plan.function_name or "", text)]
    if plan.reader == "required":
        return _read_json_calls(text, is_array=True)
    if plan.reader == "hermes":
        return _read_hermes(text)
    return _read_json_calls(text.removeprefix(PYTHON_TAG) if text.lstrip().startswith(PYTHON_TAG) else text)


def _read_hermes(text: str) -> tuple[str | None, list[Call]]:
    blocks = re.findall(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)", text, re.DOTALL)
    calls = [call for block in blocks for call in _calls_from_json(block)]
    if not calls:
        return text, []
    content = text[: text.index(HERMES_OPEN)].strip()
    return content or None, calls


def _read_json_calls(text: str, is_array: bool = False) -> tuple[str | None, list[Call]]:
    pieces = [text] if is_array else [piece for piece in text.strip().split(";") if piece.strip()]
    calls = [call for piece in pieces for call in _calls_from_json(piece)]
    if not calls or (not is_array and len(calls) != len(pieces)):
        return text, []
    return None, calls


def _calls_from_json(text: str) -> list[Call]:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return []
    objects = value if isinstance(value, list) else [value]
    calls = []
    for item in objects:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append((item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)))
    return calls


def safe_content_length(plan: ToolPlan, text: str) -> int:
    """How much of a partial output is surely content (may stream now); the rest might be a call."""
    if plan.reader in ("named", "required"):
        return 0
    if plan.reader == "hermes":
        found = text.find(HERMES_OPEN)
        return found if found >= 0 else len(text) - _held_tag_prefix(text, HERMES_OPEN)
    stripped = text.lstrip()
    if not stripped or stripped.startswith("{") or PYTHON_TAG.startswith(stripped[: len(PYTHON_TAG)]):
        return 0
    return len(text)


def _held_tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def call_entry(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}  # fmt: skip


class ToolCallStream:
    """One choice's stream: each text delta -> the message delta to send (or None)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of `text` sent as content
        self.num_calls = 0

    def feed(self, piece: str) -> dict[str, Any]:
        self.text += piece
        if self.plan.reader == "named":
            return self._named_arguments(piece)
        safe = max(self.sent, safe_content_length(self.plan, self.text))
        content, self.sent = self.text[self.sent : safe], safe
        return {"content": content} if content else {}

    def finish(self) -> dict[str, Any]:
        if self.plan.reader == "named":
            return {}
        content, calls = read_calls(self.plan, self.text)
        if not calls:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return {"content": rest} if rest else {}
        self.num_calls = len(calls)
        return {"tool_calls": [call_entry(index, name, arguments) for index, (name, arguments) in enumerate(calls)]}

    def _named_arguments(self, piece: str) -> dict[str, Any]:
        if self.num_calls == 0:
            self.num_calls = 1
            return {"tool_calls": [call_entry(0, self.plan.function_name or "", piece)]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}
