"""OpenAI request fields -> `SamplingParams`, after the request fits the served model's bounds.

Ranges that hold for every model are SamplingParams' to check, the served model's bounds
`RequestLimits`'. Differences between the two endpoints live here: completions' `logprobs` is a
count and its `max_tokens` defaults to 16 (OpenAI's default); chat's `logprobs` is a flag with
`top_logprobs` beside it, and without a limit its output runs to serve.default_chat_max_tokens
or the end of the context, whichever comes first.
"""

from __future__ import annotations

import dataclasses

from deployments.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
)
from deployments.structured_outputs import reject_unserved_fields, response_format_output
from deployments.tool_calls import ToolPlan
from deployments.request_limits import RequestLimits, parse_token_id
from protocol.sampling_params import InvalidParameterError, SamplingParams

OPENAI_DEFAULT_TEMPERATURE = 1.0
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def completion_params(request: CompletionRequest, limits: RequestLimits) -> SamplingParams:
    """`echo` with `logprobs` scores the prompt too, in the same prefill (prompt_logprobs); with
    `max_tokens` 0 that is all it does, as lm-eval's loglikelihood asks."""
    limits.check(request)
    _reject_unsupported_completion_fields(request)
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    params = _sampling_params(request, max_tokens, request.logprobs)
    prompt_logprobs = request.logprobs if request.echo else None
    grammar = response_format_output(request.response_format)
    return dataclasses.replace(params, prompt_logprobs=prompt_logprobs, structured_output=grammar)


def chat_params(request: ChatCompletionRequest, limits: RequestLimits,
                tools: ToolPlan | None = None) -> tuple[SamplingParams, bool]:  # fmt: skip
    """The params and whether the replica must fit max_tokens to its KV room (the client gave none).

    Without a limit from the client, max_tokens is the bounded default; the replica lowers it to
    what its context and KV cache leave after the prompt. The output follows the grammar of
    `tools` (tool_choice required or named) or of `response_format`, not both.
    """
    limits.check(request)
    reject_unserved_fields(request)
    grammar = response_format_output(request.response_format)
    if tools is not None and tools.constraint is not None:
        if grammar is not None:
            raise InvalidParameterError("response_format", "response_format cannot be combined with tool_choice "
                                        "required or a named function")  # fmt: skip
        grammar = tools.constraint
    params, fill = _chat_params(request, limits)
    return dataclasses.replace(params, structured_output=grammar), fill


def _chat_params(request: ChatCompletionRequest, limits: RequestLimits) -> tuple[SamplingParams, bool]:
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if max_tokens is not None and max_tokens < 1:
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        raise InvalidParameterError(name, f"must be >= 1, got {max_tokens}")
    limit = min(limits.default_chat_max_tokens, limits.max_model_len) if max_tokens is None else max_tokens
    try:
        return _sampling_params(request, limit, _chat_logprobs(request)), max_tokens is None
    except InvalidParameterError as error:
        raise _in_chat_terms(error, request) from None


def _in_chat_terms(error: InvalidParameterError, request: ChatCompletionRequest) -> InvalidParameterError:
    """Name the field the client sent: chat's count of top logprobs is `top_logprobs`."""
    names = {"logprobs": "top_logprobs"}
    if request.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    if error.param not in names:
        return error
    message = str(error).removeprefix(f"{error.param}: ")
    return InvalidParameterError(names[error.param], message)


def _chat_logprobs(request: ChatCompletionRequest) -> int | None:
    if not request.logprobs:
        if request.top_logprobs is not None:
            raise InvalidParameterError("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    return 0 if request.top_logprobs is None else request.top_logprobs


def _reject_unsupported_completion_fields(request: CompletionRequest) -> None:
    reject_unserved_fields(request)
    if request.suffix:
        raise InvalidParameterError("suffix", "suffix is not supported")
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidParameterError("best_of", "best_of other than n is not supported")


def _sampling_params(request: _SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=OPENAI_DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=_or(request.top_p, 1.0),
        top_k=0 if request.top_k == -1 else _or(request.top_k, 0),  # vLLM clients send -1 for off
        min_p=_or(request.min_p, 0.0),
        repetition_penalty=_or(request.repetition_penalty, 1.0),
        presence_penalty=_or(request.presence_penalty, 0.0),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        seed=request.seed,
        n=request.n,
        stop=stop,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        min_tokens=request.min_tokens,
        skip_special_tokens=request.skip_special_tokens,
        logit_bias=logit_bias_pairs(request.logit_bias),
    )


def logit_bias_pairs(logit_bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; a key that is no token id is a 400."""
    pairs = []
    for key, bias in (logit_bias or {}).items():
        token_id = parse_token_id(key)
        if token_id is None:
            raise InvalidParameterError("logit_bias", f"keys must be token ids (integers as strings), got {key!r}")
        pairs.append((token_id, float(bias)))
    return tuple(pairs)


def _or(value, default):
    return default if value is None else value
