"""OpenAI's logit_bias through the HTTP API over a real engine in process, in the official client's
shape ({"token id": bias}): +100 on a token makes greedy decoding emit only it, -100 on the token
greedy would pick bans it, the same text as the engine given the same bias, in both endpoints.
Bad keys and values are 400s (tests/deployments/test_structured_outputs.py)."""

from __future__ import annotations

from engine.offline import generate
from protocol.sampling_params import SamplingParams

MODEL = "tiny"
PROMPT = "The contract says that"
FORCED = 7


def _engine(reference_engine, prompt, **params):
    return generate(reference_engine, [prompt], SamplingParams(max_tokens=6, ignore_eos=True, **params))[0][0]


def _api(client, **extra):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True}, **extra).choices[0].text


def test_plus_100_forces_a_token(in_process_openai, reference_engine):
    expected = _engine(reference_engine, PROMPT, logit_bias=((FORCED, 100.0),))
    assert list(expected.token_ids) == [FORCED] * 6
    assert _api(in_process_openai, logit_bias={str(FORCED): 100}) == expected.text


def test_minus_100_bans_the_greedy_token(in_process_openai, reference_engine):
    greedy_first = _engine(reference_engine, PROMPT).token_ids[0]
    expected = _engine(reference_engine, PROMPT, logit_bias=((greedy_first, -100.0),))
    assert expected.token_ids[0] != greedy_first
    assert _api(in_process_openai, logit_bias={str(greedy_first): -100}) == expected.text


def test_chat_takes_logit_bias_too(in_process_openai):
    messages = [{"role": "user", "content": "Say anything."}]
    reply = in_process_openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                      logit_bias={str(FORCED): 100})
    single = in_process_openai.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0,
                                                  logit_bias={str(FORCED): 100}).choices[0].text
    assert reply.choices[0].message.content == single * 4
