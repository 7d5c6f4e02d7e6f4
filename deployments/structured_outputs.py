"""`response_format` -> the grammar a request's output must follow, checked in the ingress.

The grammar engine (xgrammar, on the model workers) compiles JSON schemas but ignores some
keywords silently (`not`, `if`/`then`/`else`, `uniqueItems`): a schema that uses one would get
output that breaks it. So every keyword is checked here, against what the engine enforces and
the annotations that constrain nothing; anything else is a 400 naming the keyword and where it
is. The same goes for OpenAI request fields that longctx does not serve.
"""

from __future__ import annotations

import json
from typing import Any

from deployments.openai_api import ChatCompletionRequest, CompletionRequest, ResponseFormat
from protocol.sampling_params import InvalidParameterError, StructuredOutput

# Keywords whose constraint the grammar enforces (checked against xgrammar 0.2: each one
# rejects an output that breaks it).
ENFORCED_KEYWORDS = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "dependentRequired", "unevaluatedProperties",
    "items", "prefixItems", "minItems", "maxItems", "contains", "unevaluatedItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})  # fmt: skip
# Keywords that describe and constrain nothing.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "discriminator",
})  # fmt: skip
# Keywords whose value maps names to subschemas, hold one subschema, or a list of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_ONE = ("additionalProperties", "unevaluatedProperties", "items", "contains", "propertyNames",
               "unevaluatedItems")  # fmt: skip
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")

# Request fields declared (deployments/openai_api.py) only to be refused when set.
_UNSERVED = {
    "functions": "functions is deprecated and not supported; send tools",
    "function_call": "function_call is deprecated and not supported; send tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


def reject_unserved_fields(request: CompletionRequest | ChatCompletionRequest) -> None:
    for name, why in _UNSERVED.items():
        if getattr(request, name, None):
            raise InvalidParameterError(name, why)


def response_format_output(response_format: ResponseFormat | None) -> StructuredOutput | None:
    """The grammar for `response_format`; None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput("json_object")
    if response_format.json_schema is None:
        raise InvalidParameterError("response_format.json_schema", "type json_schema needs a json_schema")
    form = response_format.json_schema
    return json_schema_output(form.json_schema, "response_format.json_schema.schema", bool(form.strict))


def json_schema_output(schema: dict[str, Any], param: str, strict: bool) -> StructuredOutput:
    check_schema(schema, param)
    return StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False), strict)


def check_schema(schema: Any, param: str, where: str = "#") -> None:
    """Every keyword of `schema` and its subschemas is enforced or an annotation."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidParameterError(param, f"{where}: a schema must be an object or a boolean")
    for keyword, value in schema.items():
        if keyword not in ENFORCED_KEYWORDS and keyword not in ANNOTATIONS:
            raise InvalidParameterError(
                param, f"{where}: the JSON schema keyword {keyword!r} is not supported by structured outputs")
        for path, subschema in _subschemas(keyword, value):
            check_schema(subschema, param, f"{where}/{keyword}{path}")


def _subschemas(keyword: str, value: Any) -> list[tuple[str, Any]]:
    if keyword in _SCHEMA_MAPS and isinstance(value, dict):
        return [(f"/{name}", subschema) for name, subschema in value.items()]
    if keyword in _SCHEMA_LISTS or (keyword == "items" and isinstance(value, list)):
        return [(f"/{index}", subschema) for index, subschema in enumerate(value if isinstance(value, list) else [])]
    if keyword in _SCHEMA_ONE:
        return [("", value)]
    return []
