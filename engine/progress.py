"""Progress of long prefills: prompt tokens done, the rate since the prefill began, the time
left. A million-token prompt takes minutes: the log says how far it is every `interval_s`
(and when it is done), and `current` feeds the CLI's progress line. No tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.request import Request

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class PrefillProgress:
    request_id: str
    done: int  # prompt tokens computed, prefix-cache hits included
    total: int
    tokens_per_s: float  # computed tokens per second since the prefill began here

    @property
    def seconds_left(self) -> float | None:
        return (self.total - self.done) / self.tokens_per_s if self.tokens_per_s > 0 else None

    def line(self) -> str:
        left = self.seconds_left
        eta = "unknown" if left is None else _duration(left)
        return (f"prefill {self.done:,} / {self.total:,} tokens ({100 * self.done // max(1, self.total)}%), "
                f"{self.tokens_per_s:,.0f} tokens/s, about {eta} left")  # fmt: skip


@dataclass
class _Started:
    time: float
    done: int
    logged_at: float


class PrefillProgressLog:
    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.current: list[PrefillProgress] = []  # after the last step, the prefills under way
        self._started: dict[str, _Started] = {}

    def observe(self, running: Iterable[Request]) -> None:
        """After a step: update every running request's prefill, log the long ones."""
        now, current, seen, started_of = self.clock(), [], set(), self._started
        for request in running:  # every running request, every step: no object made for a known one
            seen.add(request.request_id)
            started = started_of.get(request.request_id)
            if started is None:
                started = started_of[request.request_id] = _Started(now, request.num_computed_tokens, now)
            if request.num_computed_tokens >= request.num_prompt_tokens:
                self._finish(request, started, now)
                continue
            progress = _progress(request, started, now)
            current.append(progress)
            if now - started.logged_at >= self.interval_s:
                started.logged_at = now
                logger.info("request %s: %s", request.request_id, progress.line())
        if len(started_of) > len(seen):
            for request_id in set(started_of) - seen:  # finished, aborted or preempted
                del started_of[request_id]
        self.current = current

    def _finish(self, request: Request, started: _Started, now: float) -> None:
        """Log the end of a prefill that was logged under way (the others were quick)."""
        if started.logged_at > started.time:
            seconds = now - started.time
            logger.info("request %s: prefill of %s tokens done in %s", request.request_id,
                        f"{request.num_prompt_tokens:,}", _duration(seconds))  # fmt: skip
            started.logged_at = started.time  # log it once


def _progress(request: Request, started: _Started, now: float) -> PrefillProgress:
    elapsed = now - started.time
    rate = (request.num_computed_tokens - started.done) / elapsed if elapsed > 0 else 0.0
    return PrefillProgress(request.request_id, request.num_computed_tokens, request.num_prompt_tokens, rate)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
