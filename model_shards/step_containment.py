"""A step's forward pass, contained: when it raises (a CUDA out-of-memory on a long prefill chunk,
a kernel error), the requests at fault fail alone and the others get their tokens.

After the whole step failed, the worker tries again in groups:

    1. the step's decodes together (one-token chunks: the cheap, safe part)
    2. each prefill chunk alone

A group of several that fails again is split into its requests, each tried alone; a request that
fails alone is reported in `StepOutput.failed` with a one-line reason, and the engine ends it.
A retry is exact: every attempt rewrites what a failed one may have written (the dense cache is
slot-addressed by position; V4's pages are too, and its runner rewinds the open compression
windows it keeps beside them: `ContainedStep.rewind`), so a retried request's tokens are those of
an undisturbed run.

One rank only. With several ranks (TP, SP, EP) the others wait inside the forward's collectives
for the rank that raised, and a rank cannot retry alone: the failure stays fatal there, with a
message that says so (the replica is replaced). On CUDA the allocator's cache is emptied before
a retry; a device that cannot synchronize after the error (a sticky CUDA error: the context is
lost) is fatal too.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

logger = logging.getLogger(__name__)

Schedule = dict[str, int]  # request id -> tokens of its chunk in this attempt
Result = TypeVar("Result")
REASON_CHARS = 300  # a reason is one line: the error's first line, cut here


def _nothing_to_rewind(schedule: Schedule, error: Exception) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class ContainedStep(Generic[Result]):
    """What a worker lends the containment for one step."""

    forward: Callable[[Schedule], Result]  # the forward pass of these chunks; raises on failure
    chunk_start: Callable[[str], int]  # position of a request's first token in this step
    # After an attempt on a schedule failed with an error: undo what a retry would not rewrite.
    # Returns the requests that cannot be retried exactly, with why (they fail).
    rewind: Callable[[Schedule, Exception], dict[str, str]] = field(default=_nothing_to_rewind)


def run_contained(step: ContainedStep[Result], schedule: Schedule, failed: dict[str, str], *,
                  world_size: int, device: torch.device) -> list[tuple[Schedule, Result]]:
    """(schedule, result) of each group that ran, all of `schedule` in one when nothing failed;
    the requests that failed alone are added to `failed`."""
    result, error = _attempt(step, schedule)
    if error is None:
        return [(schedule, result)]
    _recover_or_raise(error, world_size, device)
    if len(schedule) == 1:  # the step's one request is the culprit: no retry would differ
        _fail(step, _rewound(step, schedule, error, failed), error, failed)
        return []
    return _retry(step, _retry_plan(_rewound(step, schedule, error, failed)), failed, world_size, device)


def _retry(step: ContainedStep[Result], plan: list[Schedule], failed: dict[str, str], world_size: int,
           device: torch.device) -> list[tuple[Schedule, Result]]:
    results, queue = [], deque(plan)
    while queue:
        group = queue.popleft()
        result, error = _attempt(step, group)
        if error is None:
            results.append((group, result))
            continue
        _recover_or_raise(error, world_size, device)
        if len(group) == 1:
            _fail(step, _rewound(step, group, error, failed), error, failed)
        else:  # its requests are tried alone
            queue.extendleft(reversed(_singles(_rewound(step, group, error, failed))))
    return results


def _attempt(step: ContainedStep[Result], schedule: Schedule) -> tuple[Result | None, Exception | None]:
    """(result, None), or (None, the error without its traceback: the traceback's frames hold the
    failed attempt's tensors, which the allocator must get back before a retry)."""
    try:
        return step.forward(schedule), None
    except Exception as error:  # noqa: BLE001 - contained by the caller, or re-raised as fatal
        # as text: a log record holding the traceback (exc_info) would keep the frames alive
        logger.warning("the forward pass of %d requests failed:\n%s", len(schedule), traceback.format_exc())
        return None, error.with_traceback(None)


def _retry_plan(schedule: Schedule) -> list[Schedule]:
    """The decodes together, then each prefill chunk alone; a step of decodes only: each alone."""
    decodes = {rid: count for rid, count in schedule.items() if count == 1}
    prefills = _singles({rid: count for rid, count in schedule.items() if count > 1})
    if not decodes or len(decodes) == len(schedule):
        return _singles(schedule)
    return [decodes, *prefills]


def _singles(schedule: Schedule) -> list[Schedule]:
    return [{rid: count} for rid, count in schedule.items()]


def _rewound(step: ContainedStep, schedule: Schedule, error: Exception, failed: dict[str, str]) -> Schedule:
    """`schedule` minus the requests that cannot be retried exactly (they fail)."""
    lost = step.rewind(schedule, error)
    failed.update(lost)
    return {rid: count for rid, count in schedule.items() if rid not in lost}


def _fail(step: ContainedStep, schedule: Schedule, error: Exception, failed: dict[str, str]) -> None:
    """The one request of `schedule` (if the rewind left it there) fails with `error`."""
    for request_id, count in schedule.items():
        failed[request_id] = failure_reason(error, count, step.chunk_start(request_id))
        logger.error("request %s failed in its forward pass: %s", request_id, failed[request_id])


def failure_reason(error: Exception, count: int, start: int) -> str:
    """One line: what failed, in which chunk, and the error's first line."""
    what = "out of GPU memory" if isinstance(error, torch.OutOfMemoryError) else "its forward pass failed"
    return f"{what} in its {count}-token chunk at position {start}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {line}"[:REASON_CHARS]


def _recover_or_raise(error: Exception, world_size: int, device: torch.device) -> None:
    """Ready the device for a retry, or raise: several ranks, or a device that cannot go on."""
    if world_size > 1:
        raise RuntimeError(
            f"the forward pass failed on this rank ({_first_line(error)}); with {world_size} ranks a step is "
            "not retried (the other ranks wait in its collectives), so the engine stops") from error
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except Exception as lost:  # noqa: BLE001 - a sticky error: every later kernel would fail alike
        raise RuntimeError(f"the device cannot go on after a failed forward pass ({_first_line(error)})") from lost
    torch.cuda.empty_cache()  # what the failed attempt's activations held, back for the retry
