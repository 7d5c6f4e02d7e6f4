"""Prompt scoring and batched prompts on /v1/completions through the official openai client, on
the session's real Ray app: `echo` + `logprobs` (max_tokens 0 allowed), as lm-eval's
loglikelihood tasks send them, and `prompt: [...]` of texts or token ids."""

from __future__ import annotations

import openai
import pytest

from engine.offline import generate
from protocol.sampling_params import SamplingParams

MODEL = "tiny"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)


def _scored(engine, prompt, top_k=2):
    return generate(engine, [prompt], SamplingParams(max_tokens=0, prompt_logprobs=top_k))[0][0]


def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt(client, reference_engine):
    prompt = "The tenant shall pay the rent"
    expected = _scored(reference_engine, prompt)
    prompt_ids = reference_engine.tokenizer.encode(prompt)
    response = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    choice = response.choices[0]
    assert choice.text == prompt
    assert choice.finish_reason == "length"
    logprobs = choice.logprobs
    token_text = reference_engine.tokenizer.decode
    assert logprobs.tokens == [token_text([token_id], skip_special_tokens=False) for token_id in prompt_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([t.logprob for t in expected.prompt_logprobs], abs=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == 0


def test_lm_eval_style_batch_of_token_prompts(client, reference_engine):
    """lm-eval's local-completions: token-id prompts, echo, logprobs=1, max_tokens=1; it reads
    token_logprobs[ctxlen:-1] (the last is the generated token)."""
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51, 52], [1, 60, 61, 62, 63]]
    response = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    for choice, prompt in zip(response.choices, prompts):
        expected = _scored(reference_engine, prompt, top_k=1)
        token_logprobs = choice.logprobs.token_logprobs
        assert len(token_logprobs) == len(prompt) + 1
        assert token_logprobs[1:-1] == pytest.approx([t.logprob for t in expected.prompt_logprobs], abs=1e-4)
        greedy = max(choice.logprobs.top_logprobs[-1].values())
        assert token_logprobs[-1] == pytest.approx(greedy)  # temperature 0: the top token was sampled
    assert response.usage.prompt_tokens == sum(map(len, prompts))
    assert response.usage.completion_tokens == 3


def test_a_batch_of_text_prompts_with_n_indexes_choices_prompt_major(client, reference_engine):
    prompts = ["Once upon a time", "The contract says"]
    response = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    expected = [generate(reference_engine, [p], SamplingParams(max_tokens=6))[0][0].text for p in prompts]
    assert [choice.text for choice in response.choices] == [expected[0], expected[0], expected[1], expected[1]]
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                            echo=True))  # fmt: skip
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == {0: prompts[0] + expected[0], 1: prompts[1] + expected[1]}


def test_a_bad_prompt_in_a_batch_fails_the_request(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=[[1, 2], [1, 10**7]], max_tokens=1)
    assert error.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[], max_tokens=1)
