"""The retry plan of a failed forward pass (model_shards/step_containment.py), on a recording
forward: which groups run, in which order, who fails with what, and when the failure stays fatal."""

from __future__ import annotations

import weakref

import pytest
import torch

from model_shards.step_containment import ContainedStep, run_contained

CPU = torch.device("cpu")


class RecordingForward:
    """Raises for any attempt that holds a culprit, or more than `max_requests` requests."""

    def __init__(self, culprits: set[str], max_requests: int = 100):
        self.culprits, self.max_requests, self.attempts = culprits, max_requests, []

    def __call__(self, schedule: dict[str, int]) -> list[str]:
        self.attempts.append(sorted(schedule))
        if self.culprits & set(schedule):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore lines")
        if len(schedule) > self.max_requests:
            raise RuntimeError("too many at once")
        return sorted(schedule)


def _run(forward, schedule, world_size=1, rewind=None):
    failed = {}
    step = ContainedStep(forward, lambda request_id: 100 * len(request_id))
    if rewind is not None:
        step = ContainedStep(step.forward, step.chunk_start, rewind)
    return run_contained(step, schedule, failed, world_size=world_size, device=CPU), failed


STEP = {"d1": 1, "big": 16384, "d2": 1, "p": 30}


def test_a_step_that_runs_is_one_group():
    results, failed = _run(RecordingForward(set()), STEP)
    assert results == [(STEP, ["big", "d1", "d2", "p"])] and failed == {}


def test_the_decodes_are_retried_together_then_each_prefill_alone():
    forward = RecordingForward({"big"})
    results, failed = _run(forward, STEP)
    assert forward.attempts == [["big", "d1", "d2", "p"], ["d1", "d2"], ["big"], ["p"]]
    assert [schedule for schedule, _ in results] == [{"d1": 1, "d2": 1}, {"p": 30}]
    assert failed == {"big": "out of GPU memory in its 16384-token chunk at position 300: "
                             "OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB"}


def test_a_step_that_fails_only_as_a_whole_loses_no_request():
    forward = RecordingForward(set(), max_requests=2)
    results, failed = _run(forward, STEP)
    assert failed == {} and sorted(rid for schedule, _ in results for rid in schedule) == ["big", "d1", "d2", "p"]


def test_a_step_of_decodes_alone_is_retried_request_by_request():
    forward = RecordingForward({"d2"})
    results, failed = _run(forward, {"d1": 1, "d2": 1, "d3": 1})
    assert forward.attempts[1:] == [["d1"], ["d2"], ["d3"]]
    assert set(failed) == {"d2"} and failed["d2"].startswith("out of GPU memory in its 1-token chunk at position 200")
    assert [schedule for schedule, _ in results] == [{"d1": 1}, {"d3": 1}]


def test_a_lone_request_fails_with_no_retry_and_others_errors_are_named():
    forward = RecordingForward(set(), max_requests=0)  # any attempt raises RuntimeError
    results, failed = _run(forward, {"x": 7})
    assert results == [] and forward.attempts == [["x"]]
    assert failed == {"x": "its forward pass failed in its 7-token chunk at position 100: "
                           "RuntimeError: too many at once"}


def test_requests_the_rewind_cannot_restore_fail_and_the_rest_are_retried():
    forward = RecordingForward({"big"})
    results, failed = _run(forward, STEP, rewind=lambda schedule, error: {"d1": "lost"} if "d1" in schedule else {})
    assert failed["d1"] == "lost" and "big" in failed
    assert [schedule for schedule, _ in results] == [{"d2": 1}, {"p": 30}]


def test_the_one_request_the_rewind_leaves_of_a_failed_pair_is_retried():
    def loses_a(schedule, error):
        return {"a": "lost"} if "a" in schedule else {}

    results, failed = _run(RecordingForward(set(), max_requests=1), {"a": 1, "b": 1}, rewind=loses_a)
    assert failed == {"a": "lost"} and results == [({"b": 1}, ["b"])]


def test_the_failed_attempt_s_tensors_are_released_before_the_retry():
    """Its traceback's frames hold them: a retry after an out-of-memory error needs that memory back."""
    failed_attempts, alive_at_retry = [], []

    def forward(schedule):
        alive_at_retry.extend(tensor() is not None for tensor in failed_attempts)
        activations = torch.empty(1 << 16)
        if "big" in schedule:
            failed_attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory")
        return activations.sum()

    _run(forward, STEP)
    assert len(failed_attempts) == 2 and alive_at_retry and not any(alive_at_retry)


def test_with_several_ranks_a_failure_stays_fatal_and_says_why():
    with pytest.raises(RuntimeError, match="with 2 ranks a step is not retried") as raised:
        _run(RecordingForward({"big"}), STEP, world_size=2)
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
