"""The V4 runner's step under model_shards/step_containment.py: what a retry of a failed forward
pass needs beyond the pages.

A retry rewrites what the failed attempt wrote into the pages (window keys, entries and overlap
halves land at the positions of the chunk's own tokens). Each request's open windows live in its
slot (open_windows.py), and `tokens[slot]` says after how many tokens:

    a chunk run on a loaded state   reads its slot and writes it back only after the forward
                                    (PagedKV.save): a failed attempt left it as it was
    a decode on the pages           writes its new row of the open window in place (the same
                                    row, the same value on a retry), and where a CSA window
                                    closes swaps the slot's overlap half for the new one: a
                                    retry would pool the entry with the wrong half

So before a step that holds a prefill chunk (the part that runs out of memory) the slots of the
decodes closing a CSA window are copied (one gather of their rows) and a retry starts from them;
`tokens` is put back for every slot. A step of decodes alone copies nothing (it would cost a
copy on most tokens): if it fails, its decodes closing a CSA window fail with it, the others are
retried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from model_shards.deepseek_v4.open_windows import OpenWindows
from model_shards.step_containment import ContainedStep, Schedule, failure_reason


class _Resumable(Protocol):
    num_computed_tokens: int
    slot: int


def contained_chunks(requests: dict[str, _Resumable], schedule: Schedule, windows: OpenWindows,
                     forward: Callable[[Schedule], object]) -> ContainedStep:
    rewind = OpenWindowsRewind(requests, schedule, windows)
    return ContainedStep(forward, lambda request_id: requests[request_id].num_computed_tokens, rewind)


class OpenWindowsRewind:
    """`ContainedStep.rewind` for V4: puts back the slots a failed attempt may have changed."""

    def __init__(self, requests: dict[str, _Resumable], schedule: Schedule, windows: OpenWindows):
        self.requests, self.windows, self.schedule = requests, windows, schedule
        self.tokens = {rid: windows.tokens.get(requests[rid].slot) for rid in schedule}  # before the step
        self.swapping: list[str] | None = None  # found on a failure only, unless a copy is taken now
        self.saved = None
        if any(count > 1 for count in schedule.values()):
            self.swapping = self._swapping(schedule)  # a copy of their slots now
            slots = [requests[rid].slot for rid in self.swapping]
            self.saved = windows.pool.data[slots].clone() if slots else None  # (swapping, slot bytes)

    def _swapping(self, schedule: Schedule) -> list[str]:
        """The decodes on the pages that close an overlapping (CSA) window: their overlap is swapped."""
        rates = {field.rows for (_, name), field in self.windows.fields().items() if name.endswith("overlap_kv")}
        return [rid for rid, count in schedule.items() if count == 1 and self._closes(rid, rates)]

    def _closes(self, request_id: str, overlap_rates: set[int]) -> bool:
        request = self.requests[request_id]
        position = request.num_computed_tokens
        return self.tokens[request_id] == position and any((position + 1) % m == 0 for m in overlap_rates)

    def __call__(self, schedule: Schedule, error: Exception) -> dict[str, str]:
        if self.swapping is None:
            self.swapping = self._swapping(self.schedule)
        lost = {}
        for request_id, count in schedule.items():
            request = self.requests[request_id]
            if self.tokens[request_id] is not None:
                self.windows.tokens[request.slot] = self.tokens[request_id]
            if request_id not in self.swapping:
                continue
            if self.saved is None:
                lost[request_id] = (f"{failure_reason(error, count, request.num_computed_tokens)} "
                                    "(a step of decodes alone keeps no copy of its open windows to retry from)")
            else:
                self.windows.pool.data[request.slot] = self.saved[self.swapping.index(request_id)]
        return lost
