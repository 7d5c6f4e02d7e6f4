"""A time that is linear in a few measured amounts, refitted to every new measurement.

    seconds ~= sum(coefficient[i] * amount[i])

e.g. one prefill step: (1 step, weight FLOPs, attention FLOPs); one restore: (1 restore, bytes).
The coefficients are the non-negative least-squares fit of the recent measurements, in relative
errors (a 4K-token step and a 1M-token restore count alike), held to a prior (the start-up
calibration, or the settings' initial values) by a small weight:

- One measurement nearly replaces the prior where it was taken: an estimate off by 2x is right
  after one measurement. With nothing else to go on the correction is shared by the terms in
  proportion to their part of the prediction (the prior's shape is kept, its scale corrected);
  measurements of other sizes then separate the terms (a fixed overhead from a per-byte cost).
  A direction that the recent measurements leave open (all steps alike, say) stays at the prior.
- Measurement k steps old weighs (1 - alpha)^k: the newest weighs about `alpha` of the whole, so
  the fit follows a machine whose speed drifts and forgets what no longer holds.
- A coefficient never drops below 1e-6 of its prior (a cost is positive): the fit is solved over
  each subset of free coefficients (at most 2^3 small solves) and the best feasible one kept.

numpy only: the control plane imports no torch.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence

import numpy as np

_PRIOR_WEIGHT = 1e-3  # of the prior against one measurement: it fills what the data leave open
_FLOOR = 1e-6  # smallest coefficient, relative to its prior
_FORGOTTEN = 1e-3  # a measurement weighing less than this is dropped


class LinearEstimate:
    def __init__(self, prior: Sequence[float], alpha: float):
        self._decay = 1.0 - alpha
        window = 1 if self._decay <= 0 else math.ceil(math.log(_FORGOTTEN) / math.log(self._decay))
        self._samples: deque[tuple[np.ndarray, float]] = deque(maxlen=max(1, min(window, 256)))
        self.num_observations = 0
        self.reset(prior)

    def reset(self, prior: Sequence[float]) -> None:
        """A new prior; the measurements so far are forgotten."""
        if any(c <= 0 for c in prior):
            raise ValueError(f"prior coefficients must be positive, got {list(prior)}")
        self._prior = np.array(prior, dtype=np.float64)
        self.coefficients = [float(c) for c in prior]
        self._samples.clear()

    def predict(self, amounts: Sequence[float]) -> float:
        return sum(c * a for c, a in zip(self.coefficients, amounts, strict=True))

    def observe(self, amounts: Sequence[float], seconds: float) -> None:
        if seconds <= 0 or not math.isfinite(seconds) or not any(amounts):
            return
        self._samples.append((np.array(amounts, dtype=np.float64), seconds))
        self.num_observations += 1
        weights = [self._decay ** age for age in range(len(self._samples) - 1, -1, -1)]
        self.coefficients = self._fit(list(self._samples), weights)

    def calibrate(self, samples: Sequence[tuple[Sequence[float], float]]) -> None:
        """Fit these measurements, all weighing alike, and make the fit the new prior."""
        usable = [(np.array(a, dtype=np.float64), s) for a, s in samples if s > 0 and any(a)]
        if usable:
            self.reset(self._fit(usable, [1.0] * len(usable)))

    def _fit(self, samples: list[tuple[np.ndarray, float]], weights: Sequence[float]) -> list[float]:
        """argmin over ratios r >= floor of sum w (prediction / measured - 1)^2 + prior weight
        * sum ((r - 1) / max(1, r))^2, where coefficient = r * prior (ratios keep the columns
        alike in scale). The prior's pull is bounded: a guess 50x off costs no more than one 2x
        off, so the data move it as easily (solved by reweighting, a few rounds at most)."""
        rows = [math.sqrt(w) * amounts * self._prior / seconds for (amounts, seconds), w in zip(samples, weights)]
        targets = [math.sqrt(w) for w in weights]
        scales = np.maximum(1.0, np.array(self.coefficients) / self._prior)
        for _ in range(4):
            ratios = self._solve(np.vstack(rows), np.array(targets), scales)
            new_scales = np.maximum(1.0, ratios)
            if np.all(np.abs(new_scales / scales - 1.0) < 0.1):
                break
            scales = new_scales
        return [float(c) for c in ratios * self._prior]

    def _solve(self, rows: np.ndarray, targets: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Non-negative least squares over the ratios, the prior rows divided by `scales`."""
        n = len(self._prior)
        prior_rows = math.sqrt(_PRIOR_WEIGHT) * np.diag(1.0 / scales)
        matrix = np.vstack([rows, prior_rows])
        target = np.concatenate([targets, prior_rows @ np.ones(n)])
        best, best_cost = np.full(n, _FLOOR), math.inf
        for free in _subsets(n):
            ratios = np.full(n, _FLOOR)  # the coefficients not free stay at their floor
            pinned = [i for i in range(n) if i not in free]
            ratios[free], *_ = np.linalg.lstsq(matrix[:, free], target - matrix[:, pinned] @ ratios[pinned], rcond=None)
            cost = float(np.sum((matrix @ ratios - target) ** 2))
            if np.all(ratios >= _FLOOR) and cost < best_cost:
                best, best_cost = ratios, cost
        return best


def _subsets(n: int) -> list[list[int]]:
    """Every non-empty subset of range(n), largest first."""
    return [list(free) for size in range(n, 0, -1) for free in itertools.combinations(range(n), size)]
