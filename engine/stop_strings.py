"""Stop strings over streamed text (OpenAI semantics: the stop string itself is not returned).

A stop string can arrive split over many deltas, so a streamed client must not see the start of
one before we know whether it completes. The matcher holds back the longest tail of the text that
is a prefix of some stop string; everything before that tail can never be part of a match and is
released at once. The held tail is shorter than the longest stop string, so each `feed` scans a
few characters more than the delta, however long the output.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas; get back what may be emitted now and whether a stop string was hit."""

    def __init__(self, stop: Sequence[str]):
        if any(not text for text in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text to emit, stopped). On a hit the text ends right before the earliest stop string."""
        if not self.stop:  # no stop strings (most requests): nothing held, nothing to look for
            return delta, False
        if self.stopped:
            return "", True
        text = self._held + delta
        match = self._earliest_match(text)
        if match is not None:
            self._held, self.stopped = "", True
            return text[:match], True
        hold = self._longest_partial_match(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held text, at the end of generation (nothing after a stop string was hit)."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, text: str) -> int | None:
        """Start of the stop string that completes first, as if the text came one character at a time.

        The earliest end wins, so the result does not depend on how the text was split into deltas;
        among stops ending together the longest wins ("xab" with stops "ab" and "b" gives "x").
        """
        matches = [(start + len(stop), start) for stop in self.stop if (start := text.find(stop)) >= 0]
        return min(matches)[1] if matches else None

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with (and is not complete)."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
