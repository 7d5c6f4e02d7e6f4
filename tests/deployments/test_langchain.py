"""LangChain's OpenAI chat model (langchain-openai) against the API, as its users call it:
invoke and stream, bind_tools with a forced or any tool, with_structured_output by JSON schema
and by function calling."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")
pytest.importorskip("xgrammar")


class GetWeather(BaseModel):
    """The weather forecast of a city."""

    city: Literal["Paris", "Rome"]
    days: int = Field(ge=1, le=5)


class Trip(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    nights: int = Field(ge=1, le=9)
    return_ticket: bool


@pytest.fixture(scope="module")
def llm(in_process_http):
    return langchain_openai.ChatOpenAI(model="tiny", base_url="http://in-process/v1", api_key="unused",
                                       http_client=in_process_http, temperature=0, max_tokens=60, max_retries=0)


def test_invoke_and_stream_agree(llm):
    whole = llm.invoke("Say something")
    streamed = "".join(chunk.content for chunk in llm.stream("Say something"))
    assert whole.content and streamed == whole.content


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])
def test_bind_tools_gets_a_tool_call_with_valid_arguments(llm, tool_choice):
    message = llm.bind_tools([GetWeather], tool_choice=tool_choice).invoke("Weather in Rome?")
    [call] = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    chunks = list(llm.bind_tools([GetWeather], tool_choice=tool_choice).stream("Weather in Rome?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_model(llm, method):
    trip = llm.with_structured_output(Trip, method=method).invoke("Plan a trip")
    assert isinstance(trip, Trip)
