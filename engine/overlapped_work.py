"""Host work that runs while the device runs a step (`scheduler.overlap_outputs`).

The engine makes a step's text (detokenizing, stop strings, deltas) and publishes it while the
next step runs: the worker calls the work once its kernels are queued, right before it waits for
the sampled tokens (model_shards/worker.py). The work runs inside the worker's step, whose handlers
contain a request's failure to that request; so the work never raises there: its error is kept and
raised by `finish`, on the engine's side, as if the work had run there.
"""

from __future__ import annotations

from typing import Callable


class OverlappedWork:
    """`work()` at most once: on the first call, or at `finish` if nobody called it before."""

    def __init__(self, work: Callable[[], None]):
        self._work: Callable[[], None] | None = work
        self._error: BaseException | None = None

    def __call__(self) -> None:
        work, self._work = self._work, None
        if work is None:
            return
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - raised by finish(), outside the worker's step
            self._error = error

    def finish(self) -> None:
        """Run the work if it has not run; raise its error if it failed."""
        self()
        error, self._error = self._error, None
        if error is not None:
            raise error
