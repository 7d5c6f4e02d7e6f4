"""Host work handed to one step, run while the device computes it (scheduler.overlap_outputs:
the engine's text of the step before, engine/overlapped_work.py)."""

from __future__ import annotations

from typing import Callable, TypeVar

Result = TypeVar("Result")


class WorkBeforeHostWait:
    """Runs the step's work once: at the step's first wait for the device (`run`, called right
    before a device-to-host copy, once the step's kernels are queued), or at the step's end when
    it never waits. The work never raises (engine/overlapped_work.py keeps its error)."""

    def __init__(self):
        self._work: Callable[[], None] | None = None

    def around(self, work: Callable[[], None] | None, step: Callable[[], Result]) -> Result:
        """`step()` with `work` handed in for it."""
        self._work = work
        try:
            return step()
        finally:
            self.run()

    def run(self) -> None:
        work, self._work = self._work, None
        if work is not None:
            work()
