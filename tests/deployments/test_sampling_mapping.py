"""OpenAI request fields -> SamplingParams, and the 400s that name the parameter."""

import pytest

from deployments.openai_api import ChatCompletionRequest, CompletionRequest
from deployments.request_limits import RequestLimits
from deployments.sampling import chat_params, completion_params
from protocol.sampling_params import InvalidParameterError, SamplingParams

MAX_MODEL_LEN = 4096
LIMITS = RequestLimits(max_model_len=MAX_MODEL_LEN, vocab_size=1024, max_n=16, default_chat_max_tokens=512)


def _chat(**fields):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_completion_defaults_follow_openai():
    params = completion_params(CompletionRequest(prompt="x"), LIMITS)
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.top_p == 1.0
    assert params.logprobs is None and params.stop == () and params.n == 1


def test_every_openai_and_extra_field_is_mapped():
    request = CompletionRequest(
        prompt="x", max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=["a", "b"], seed=11,
        presence_penalty=0.5, frequency_penalty=-0.5, logprobs=3, top_k=40, min_p=0.05,
        repetition_penalty=1.2, min_tokens=2, ignore_eos=True, stop_token_ids=[5], skip_special_tokens=False,
    )  # fmt: skip
    assert completion_params(request, LIMITS) == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=("a", "b"), seed=11, presence_penalty=0.5,
        frequency_penalty=-0.5, logprobs=3, top_k=40, min_p=0.05, repetition_penalty=1.2, min_tokens=2,
        ignore_eos=True, stop_token_ids=(5,), skip_special_tokens=False,
    )  # fmt: skip


def test_a_single_stop_string_and_vllm_top_k_off():
    params = completion_params(CompletionRequest(prompt="x", stop="END", top_k=-1), LIMITS)
    assert params.stop == ("END",) and params.top_k == 0


def test_chat_max_completion_tokens_wins_over_max_tokens():
    params, fill = chat_params(_chat(max_tokens=50, max_completion_tokens=20), LIMITS)
    assert params.max_tokens == 20 and not fill
    params, fill = chat_params(_chat(max_tokens=50), LIMITS)
    assert params.max_tokens == 50 and not fill


def test_chat_without_a_limit_gets_the_bounded_default_which_the_replica_may_lower():
    params, fill = chat_params(_chat(min_tokens=100), LIMITS)
    assert fill and params.max_tokens == 512 and params.min_tokens == 100
    short_context = RequestLimits(max_model_len=256, vocab_size=1024, max_n=16, default_chat_max_tokens=512)
    assert chat_params(_chat(), short_context)[0].max_tokens == 256


def test_chat_logprobs_flag_and_top_logprobs():
    assert chat_params(_chat(), LIMITS)[0].logprobs is None
    assert chat_params(_chat(logprobs=True), LIMITS)[0].logprobs == 0
    assert chat_params(_chat(logprobs=True, top_logprobs=5), LIMITS)[0].logprobs == 5


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"n": 17}, "n"),  # the served model's bounds (RequestLimits)
        ({"n": 2, "best_of": 17}, "best_of"),
        ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
        ({"stop_token_ids": [1, 1024]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"top_k": 1025}, "top_k"),
        ({"top_k": 10**20}, "top_k"),
    ],
)
def test_completion_errors_name_the_parameter(fields, param):
    with pytest.raises(InvalidParameterError) as error:
        completion_params(CompletionRequest(prompt="x", **fields), LIMITS)
    assert error.value.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 200}, "temperature"),
        ({"max_completion_tokens": MAX_MODEL_LEN + 1}, "max_completion_tokens"),
        ({"max_tokens": MAX_MODEL_LEN + 1, "max_completion_tokens": 5}, "max_tokens"),
        ({"n": 1000000000}, "n"),
    ],
)
def test_chat_errors_name_the_parameter(fields, param):
    with pytest.raises(InvalidParameterError) as error:
        chat_params(_chat(**fields), LIMITS)
    assert error.value.param == param


def test_non_text_content_parts_are_refused():
    request = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(InvalidParameterError) as error:
        request.template_messages()
    assert error.value.param == "messages"
