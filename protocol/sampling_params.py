"""Per-request sampling settings, validated once when the request arrives.

Names follow OpenAI / vLLM so that the HTTP layer maps them one to one. A bad value raises
`InvalidParameterError` naming the parameter, which the HTTP layer turns into a 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class InvalidParameterError(ValueError):
    """A request parameter out of range. `param` is the OpenAI-style parameter name."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param

    def __reduce__(self):
        # Exception's default pickling calls cls(*self.args), but args hold the one joined string
        # while __init__ takes (param, message): rebuilt from type, args and attributes instead, so
        # the error (and a subclass's `code`) crosses a process boundary (engine/engine_process.py).
        return _rebuild_error, (type(self), self.args, dict(self.__dict__))


def _rebuild_error(cls: type[BaseException], args: tuple, attributes: dict) -> BaseException:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(attributes)
    return error


MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # biased tokens a request: each one is an entry the sampler adds every step
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, +100 all but forces it


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow; the worker turns it into a token mask each step.

    `json_schema`: `spec` is a JSON schema (text); `strict` forbids properties and items the schema
    does not name. `json_object`: any JSON object (`spec` unused).
    """

    kind: Literal["json_schema", "json_object"]
    spec: str = ""
    strict: bool = True


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0: prefill only (warms the prefix cache; with prompt_logprobs, scores the prompt)
    temperature: float = 0.0  # 0: greedy (argmax), the CLI default
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off; Hugging Face / CTRL semantics over prompt + output
    presence_penalty: float = 0.0  # OpenAI semantics over output tokens only
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    min_tokens: int = 0
    skip_special_tokens: bool = True
    # None: none; k >= 0: each prompt token's logprob given the tokens before it, and the top k.
    # Computed in the prefill that runs anyway; such a prompt is never served from the prefix cache.
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None
    # (token id, bias) pairs added to the logits before penalties and sampling (OpenAI's
    # logit_bias); logprobs stay those of the raw logits, as vLLM reports them.
    logit_bias: tuple[tuple[int, float], ...] = ()
    eos_token_ids: tuple[int, ...] = field(default=(), compare=False)  # filled by the engine from the model

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_probabilities()
        self._check_penalties()
        self._check_logit_bias()

    def _check_counts(self) -> None:
        if self.max_tokens < 0:
            raise InvalidParameterError("max_tokens", f"must be >= 0, got {self.max_tokens}")
        if self.n < 1:
            raise InvalidParameterError("n", f"must be >= 1, got {self.n}")
        if self.top_k < 0:
            raise InvalidParameterError("top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidParameterError(name, f"must be between 0 and {MAX_LOGPROBS}, got {value}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidParameterError("min_tokens", f"must be between 0 and max_tokens, got {self.min_tokens}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidParameterError("seed", f"must fit 64 bits (-2**63 to 2**64 - 1), got {self.seed}")
        if any(not isinstance(text, str) or text == "" for text in self.stop):
            raise InvalidParameterError("stop", "stop strings must be non-empty strings")

    def _check_probabilities(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidParameterError("temperature", f"must be between 0 and 100, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameterError("min_p", f"must be in [0, 1], got {self.min_p}")

    def _check_penalties(self) -> None:
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise InvalidParameterError("repetition_penalty", f"must be in (0, 100], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidParameterError(name, f"must be between -2 and 2, got {value}")

    def _check_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParameterError("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise InvalidParameterError("logit_bias", f"token ids must be >= 0, got {token_id}")
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:  # NaN fails both
                raise InvalidParameterError("logit_bias", f"biases must be between -100 and 100, got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
