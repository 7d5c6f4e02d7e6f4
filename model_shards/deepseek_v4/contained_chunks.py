"""The V4 runner's step under model_shards/step_containment.py: what a retry of a failed forward
pass needs beyond the pages.

A retry rewrites what the failed attempt wrote into the pages (window keys, overlap halves and
entries all land at the positions of the chunk's own tokens), and a chunk that starts on a block
boundary rebuilds its whole state from the pages and `num_computed_tokens`. A chunk that starts
inside a block resumes from the request's slot (its open compression windows, paged_state.py),
which the forward pass advances as it goes: a failed attempt leaves it part-advanced, and a retry
from it would append the chunk twice. So before a step that holds a prefill chunk (the part that
runs out of memory) each such slot is snapshotted (`SequenceState.snapshot`: tensors are shared,
never written in place) and a retry starts from a copy of that. A step of decodes alone takes no
snapshot (about 4 us a layer and request, on every token); if it fails, its requests that resume
inside a block fail with it, the others are retried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from model_shards.deepseek_v4.state import SequenceState
from model_shards.step_containment import ContainedStep, Schedule, failure_reason


class _Resumable(Protocol):
    num_computed_tokens: int
    slot: SequenceState | None


def contained_chunks(requests: dict[str, _Resumable], schedule: Schedule, block_size: int,
                     forward: Callable[[Schedule], object]) -> ContainedStep:
    rewind = OpenWindowsRewind(requests, schedule, block_size)
    return ContainedStep(forward, lambda request_id: requests[request_id].num_computed_tokens, rewind)


class OpenWindowsRewind:
    """`ContainedStep.rewind` for V4: puts back the slots a failed attempt may have advanced."""

    def __init__(self, requests: dict[str, _Resumable], schedule: Schedule, block_size: int):
        self.requests, self.block_size = requests, block_size
        has_prefill = any(count > 1 for count in schedule.values())
        self.saved = {rid: self.requests[rid].slot.snapshot() for rid in schedule
                      if self._resumes_from_slot(rid)} if has_prefill else None

    def _resumes_from_slot(self, request_id: str) -> bool:
        request = self.requests[request_id]
        return request.slot is not None and request.num_computed_tokens % self.block_size != 0

    def __call__(self, schedule: Schedule, error: Exception) -> dict[str, str]:
        lost = {}
        for request_id, count in schedule.items():
            if not self._resumes_from_slot(request_id):
                continue  # its state is rebuilt from the pages
            if self.saved is None:
                lost[request_id] = (f"{failure_reason(error, count, self.requests[request_id].num_computed_tokens)} "
                                    "(a step of decodes alone keeps no copy of its open windows to retry from)")
            else:  # a copy: the retry advances it in turn, and may fail again
                self.requests[request_id].slot = self.saved[request_id].snapshot()
        return lost
