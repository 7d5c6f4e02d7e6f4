"""vLLM's truncate_prompt_tokens over the HTTP API on a real engine in process: the prompt keeps
its last k tokens (what the answer follows), a prompt longer than the context then fits (-1:
the longest that leaves one output token), the usage and the echo say what was kept, and an
out-of-range k is a 400 naming the field."""

from __future__ import annotations

import pytest

from engine.offline import generate
from protocol.sampling_params import SamplingParams

MODEL = "tiny"
CONTEXT = 4096  # tokens: the tiny model's max_position_embeddings (tests/deployments/conftest.py)


def test_the_last_k_tokens_are_what_the_engine_sees(in_process_openai, reference_engine):
    prompt = "Clause one binds the tenant. Clause two binds the landlord. What does clause two say?"
    ids = reference_engine.tokenizer.encode(prompt)
    kept = ids[-8:]
    expected = generate(reference_engine, [kept], SamplingParams(max_tokens=6))[0][0]
    completion = in_process_openai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True,
        extra_body={"truncate_prompt_tokens": 8})
    assert completion.usage.prompt_tokens == 8
    assert completion.choices[0].text == reference_engine.tokenizer.decode(kept) + expected.text


def test_a_prompt_longer_than_the_context_fits_once_truncated(in_process_openai, in_process_http):
    long_ids = [17] * (CONTEXT + 500)
    refused = in_process_http.post("/v1/completions", json={"model": MODEL, "prompt": long_ids, "max_tokens": 1})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    fitted = in_process_openai.completions.create(model=MODEL, prompt=long_ids, max_tokens=1, temperature=0,
                                                  extra_body={"truncate_prompt_tokens": -1})
    assert fitted.usage.prompt_tokens == CONTEXT - 1 and fitted.usage.completion_tokens == 1
    chat = in_process_openai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "clause " * (CONTEXT + 10)}], max_tokens=1,
        extra_body={"truncate_prompt_tokens": 100})
    assert chat.usage.prompt_tokens == 100


@pytest.mark.parametrize("value", [0, -2, CONTEXT, 10**12])
def test_an_out_of_range_k_is_a_400(in_process_http, value):
    response = in_process_http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                             "truncate_prompt_tokens": value})
    assert response.status_code == 400 and response.json()["error"]["param"] == "truncate_prompt_tokens"
