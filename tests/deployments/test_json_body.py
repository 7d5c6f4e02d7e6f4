"""Request bodies go through pydantic-core's JSON parser (deployments/json_body.py) with the json
module's results and errors: the same values for every body the json module reads, malformed
JSON still a 400 in OpenAI's form; and a token-id prompt is not walked id by id to count its
characters (deployments/api.py `_num_chars`)."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.api import _num_chars
from deployments.json_body import FastJSONRequest

BODIES = [
    {"model": "tiny", "prompt": list(range(100, 40_000)), "max_tokens": 3, "stream": True},
    {"prompt": "東京 café \u00e9\n\"quoted\" \\ tab\t", "temperature": 0.7, "top_p": 1.0, "seed": 2**63 - 1},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["\n", "END"], "logit_bias": {"50": -100}},
    {"prompt": [[1, 2, 3], [4, 5]], "n": 2, "echo": False, "stream_options": None, "x": 1e-300},
    [1, 2.5, None, True, "a"],
]


def _parsed(body: bytes):
    async def read():
        sent = False

        async def receive():
            nonlocal sent
            message = {"type": "http.request", "body": b"" if sent else body, "more_body": False}
            sent = True
            return message

        return await FastJSONRequest({"type": "http", "method": "POST", "headers": []}, receive).json()

    return asyncio.run(read())


@pytest.mark.parametrize("value", BODIES)
def test_a_body_parses_to_what_json_loads_gives(value):
    body = json.dumps(value, ensure_ascii=False).encode()
    parsed = _parsed(body)
    assert parsed == json.loads(body)
    assert json.dumps(parsed) == json.dumps(json.loads(body))  # same types too (ints stay ints)


def test_json_only_the_json_module_reads_still_parses():
    for body in ('{"prompt": "x"}'.encode("utf-16"), b'{"prompt": "\\ud800"}', b'{"x": NaN}'):
        value = _parsed(body)
        assert json.dumps(value) == json.dumps(json.loads(body))


@pytest.mark.parametrize("body", [b'{"prompt": ', b"", b"{'prompt': 1}", b'{"a": 1,}'])
def test_malformed_json_raises_the_json_module_s_error(body):
    with pytest.raises(json.JSONDecodeError):
        _parsed(body)


def test_malformed_json_is_a_400_in_openai_form_in_process(in_process_http):
    response = in_process_http.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_without_a_json_content_type_is_told_so(in_process_http, content_type):
    """`curl -d` sends a form's Content-Type: the 400 names the header, not the JSON."""
    headers = {} if content_type is None else {"content-type": content_type}
    response = in_process_http.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 1}', headers=headers)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "Content-Type: application/json" in message and repr(content_type or "none") in message


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_with_parameters_or_suffixes_are_json(in_process_http, content_type):
    response = in_process_http.post("/v1/completions", content=b'[1, 2]', headers={"content-type": content_type})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("the request body must be a JSON object")
    ok = in_process_http.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 1}',
                              headers={"content-type": content_type})
    assert ok.status_code == 200, ok.text


def test_a_long_token_id_prompt_streams_through_the_fast_parser(in_process_http):
    body = {"model": "tiny", "prompt": [100 + i % 500 for i in range(3000)], "max_tokens": 2, "temperature": 0.0}
    response = in_process_http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 3000


def test_num_chars_counts_texts_and_not_token_ids():
    assert _num_chars("héllo") == 5
    assert _num_chars(["ab", "cde"]) == 5
    assert _num_chars(list(range(50_000))) == 0
    assert _num_chars([[1, 2], [3]]) == 0
    assert _num_chars([]) == 0
