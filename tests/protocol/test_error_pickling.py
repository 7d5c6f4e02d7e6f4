"""The errors a request can raise inside the engine cross a process boundary intact (the engine
loop may run in a child process: engine/engine_process.py): type, message, `param` and `code`."""

from __future__ import annotations

import pickle

from engine.engine_loop import EngineDeadError
from engine.llm_engine import ContextLengthExceededError
from engine.outputs import RequestFailedError
from engine.scheduler import QueueFullError
from protocol.sampling_params import InvalidParameterError


def _round_trip(error: BaseException) -> BaseException:
    return pickle.loads(pickle.dumps(error))


def test_an_invalid_parameter_keeps_its_param_message_and_code():
    error = InvalidParameterError("max_tokens", "must be at least 1, got 0")
    error.code = "invalid_value"
    copy = _round_trip(error)
    assert type(copy) is InvalidParameterError
    assert (copy.param, copy.code, str(copy)) == ("max_tokens", "invalid_value", "max_tokens: must be at least 1, got 0")


def test_a_context_length_error_keeps_its_class_code():
    copy = _round_trip(ContextLengthExceededError("prompt", "the prompt has 9 tokens"))
    assert type(copy) is ContextLengthExceededError
    assert (copy.param, copy.code, str(copy)) == ("prompt", "context_length_exceeded", "prompt: the prompt has 9 tokens")


def test_queue_full_request_failed_and_engine_dead_errors_round_trip():
    for cls in (QueueFullError, RequestFailedError, EngineDeadError):
        copy = _round_trip(cls("why it failed"))
        assert (type(copy), str(copy)) == (cls, "why it failed")
