"""The bounds of the served model and config that a request must fit, checked at the ingress
before any work is done for it (tokenizing, routing, queueing).

`SamplingParams` checks the ranges that hold for every model (temperature, top_p, seeds to 64
bits, ...); the engine checks these bounds again (it is the authority, and other callers bypass
the ingress). Here they cost nothing: a request that asks for a billion choices, a token id
beyond the vocabulary or more tokens than the context holds is refused before its prompt is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.openai_api import ChatCompletionRequest, CompletionRequest, _SamplingFields
from protocol.sampling_params import InvalidParameterError


def parse_token_id(key: str) -> int | None:
    """A logit_bias key as a token id: ASCII digits (JSON object keys are strings); None if not."""
    key = key.strip()
    return int(key) if key.isascii() and key.isdigit() else None


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int  # tokens, prompt and output together
    vocab_size: int
    max_n: int  # choices per request (n, best_of): serve.max_n
    default_chat_max_tokens: int  # chat without max_tokens: serve.default_chat_max_tokens

    def check(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        """InvalidParameterError naming the first field beyond a bound."""
        self._check_choices("n", request.n)
        if isinstance(request, CompletionRequest) and request.best_of is not None:
            self._check_choices("best_of", request.best_of)
        self._check_output_length(request)
        self._check_vocabulary(request)

    def _check_choices(self, name: str, value: int) -> None:
        if not 1 <= value <= self.max_n:
            raise InvalidParameterError(name, f"must be between 1 and {self.max_n} (serve.max_n), got {value}")

    def _check_output_length(self, request: _SamplingFields) -> None:
        named = [("max_tokens", request.max_tokens)]
        if isinstance(request, ChatCompletionRequest):
            named.append(("max_completion_tokens", request.max_completion_tokens))
        for name, value in named:
            if value is not None and value > self.max_model_len:
                raise InvalidParameterError(
                    name, f"must be at most {self.max_model_len}, the model's context length, got {value}")

    def _check_vocabulary(self, request: _SamplingFields) -> None:
        if any(not 0 <= token_id < self.vocab_size for token_id in request.stop_token_ids or ()):
            raise InvalidParameterError("stop_token_ids", f"token ids must be in [0, {self.vocab_size})")
        if any((parse_token_id(key) or 0) >= self.vocab_size for key in request.logit_bias or {}):
            raise InvalidParameterError("logit_bias", f"token ids must be in [0, {self.vocab_size})")
        if request.top_k is not None and not -1 <= request.top_k <= self.vocab_size:
            raise InvalidParameterError(
                "top_k", f"must be -1 or 0 (off) or at most the vocabulary size {self.vocab_size}, got {request.top_k}")
