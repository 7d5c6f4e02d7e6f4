"""`longctx generate`'s progress on stderr while a long prompt is prefilled: tokens done, rate,
time left. Quiet for prompts that take under QUIET_S; one line redrawn on a terminal, a line
every PIPE_INTERVAL_S otherwise (a log file stays readable)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from engine.progress import PrefillProgress

QUIET_S = 2.0
TERMINAL_INTERVAL_S = 0.5
PIPE_INTERVAL_S = 10.0


class ProgressLine:
    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.clock = clock
        self.terminal = stream.isatty()
        self.interval_s = TERMINAL_INTERVAL_S if self.terminal else PIPE_INTERVAL_S
        self._start = clock()
        self._last = self._start + QUIET_S - self.interval_s  # the first line comes after QUIET_S
        self._drawn = False

    def __call__(self, prefills: list[PrefillProgress]) -> None:
        now = self.clock()
        if not prefills or now - self._last < self.interval_s:
            return
        self._last = now
        text = "longctx: " + "; ".join(progress.line() for progress in prefills)
        if self.terminal:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True

    def done(self) -> None:
        if self._drawn and self.terminal:
            self.stream.write("\n")
            self.stream.flush()
