"""A time that is linear in a few measured amounts, refitted to every new measurement.

    seconds ~= sum(coefficient[i] * amount[i])

e.g. one prefill step: (1 step, weight FLOPs, attention FLOPs); one restore: (1 restore, bytes).
The coefficients are the non-negative least-squares fit of the recent measurements, in errors
relative to the fit (a 4K-token step and a 1M-token restore count alike), held to a prior (the
start-up calibration, or the settings' initial values) by a small weight:

- One measurement nearly replaces the prior where it was taken: an estimate off by 2x is right
  after one measurement. With nothing else to go on the correction is shared by the terms in
  proportion to their part of the prediction (the prior's shape is kept, its scale corrected);
  measurements of other sizes then separate the terms (a fixed overhead from a per-byte cost).
  A direction that the recent measurements leave open (all steps alike, say) stays at the prior.
- Measurement k steps old weighs (1 - alpha)^k: the newest weighs about `alpha` of the whole, so
  the fit follows a machine whose speed drifts and forgets what no longer holds.
- A coefficient never drops below 1e-6 of its prior (a cost is positive): the fit is solved over
  each subset of free coefficients (at most 2^3 small solves) and the best feasible one kept.
- A measurement more than 4x off the prediction is held back until another of about the same
  amounts comes: if that one is far off the same way too, both count (the machine is not what
  the estimate thought); if not, the first was a one-off stall (a kernel planning a new shape,
  ~70 ms of cuDNN on an H100; a collection) and is dropped.

numpy only: the control plane imports no torch.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence

import numpy as np

_PRIOR_WEIGHT = 1e-3  # of the prior against one measurement: it fills what the data leave open
_CALIBRATION_PRIOR_WEIGHT = 1e-9  # of the initial guess against the start-up probe's measurements
_FLOOR = 1e-6  # smallest coefficient, relative to its prior
_FORGOTTEN = 1e-3  # a measurement weighing less than this is dropped
_OUTLIER = 4.0  # a measurement this many times off the prediction waits for the next one


class LinearEstimate:
    def __init__(self, prior: Sequence[float], alpha: float):
        self._decay = 1.0 - alpha
        window = 1 if self._decay <= 0 else math.ceil(math.log(_FORGOTTEN) / math.log(self._decay))
        self._samples: deque[tuple[np.ndarray, float]] = deque(maxlen=max(1, min(window, 256)))
        self.num_observations = 0
        self._held: list[tuple[np.ndarray, float, bool]] = []  # outliers waiting: (amounts, seconds, slower)
        self.reset(prior)

    def reset(self, prior: Sequence[float]) -> None:
        """A new prior; the measurements so far are forgotten."""
        if any(c <= 0 for c in prior):
            raise ValueError(f"prior coefficients must be positive, got {list(prior)}")
        self._prior = np.array(prior, dtype=np.float64)
        self.coefficients = [float(c) for c in prior]
        self._samples.clear()
        self._held = []

    def predict(self, amounts: Sequence[float]) -> float:
        return sum(c * a for c, a in zip(self.coefficients, amounts, strict=True))

    def observe(self, amounts: Sequence[float], seconds: float) -> None:
        if seconds <= 0 or not math.isfinite(seconds) or not any(amounts):
            return
        sample = (np.array(amounts, dtype=np.float64), seconds)
        ratio = seconds / max(self.predict(amounts), 1e-300)
        if 1 / _OUTLIER <= ratio <= _OUTLIER:
            self._held = [held for held in self._held if not _alike(held[0], sample[0])]  # one-offs
        else:
            twin = next((index for index, held in enumerate(self._held)
                         if held[2] == (ratio > 1) and _alike(held[0], sample[0])), None)
            if twin is None:
                self._held = (self._held + [(*sample, ratio > 1)])[-4:]
                return
            self._samples.append(self._held.pop(twin)[:2])
        self._samples.append(sample)
        self.num_observations += 1
        weights = [self._decay ** age for age in range(len(self._samples) - 1, -1, -1)]
        self.coefficients = self._fit(list(self._samples), weights)

    def calibrate(self, samples: Sequence[tuple[Sequence[float], float]]) -> None:
        """Fit these measurements, all weighing alike, and make the fit the new prior. The old
        prior (a guess) only fills directions the samples leave open: a term worth 2% of each
        sample is still theirs to set (at the serving weight the guess would pull it halfway)."""
        usable = [(np.array(a, dtype=np.float64), s) for a, s in samples if s > 0 and any(a)]
        if usable:
            self.reset(self._fit(usable, [1.0] * len(usable), _CALIBRATION_PRIOR_WEIGHT))

    def _fit(self, samples: list[tuple[np.ndarray, float]], weights: Sequence[float],
             prior_weight: float = _PRIOR_WEIGHT) -> list[float]:
        """argmin over ratios r >= floor of sum w ((prediction - measured) / fitted prediction)^2
        + prior weight * sum ((r - 1) / max(1, r))^2, where coefficient = r * prior (ratios keep
        the columns alike in scale). Errors relative to the fit, not to the measurement, so that
        a machine grown 10x slower moves it as fast as one grown 10x faster; the prior's pull is
        bounded, so a guess 50x off costs no more than one 2x off. Both by reweighting: a few
        rounds at most."""
        coefficients = np.array(self.coefficients)
        amounts = np.vstack([sample_amounts for sample_amounts, _ in samples])  # (samples, terms)
        seconds = np.array([sample_seconds for _, sample_seconds in samples])
        root_weights = np.sqrt(np.asarray(weights, dtype=np.float64))
        for _ in range(4):
            scaled = root_weights / np.maximum(amounts @ coefficients, 1e-300)  # sqrt(w) / prediction
            scales = np.maximum(1.0, coefficients / self._prior)
            fitted = self._solve(amounts * self._prior * scaled[:, None], seconds * scaled, scales,
                                 prior_weight) * self._prior  # fmt: skip
            settled = np.all(np.abs(fitted - coefficients) <= 0.05 * np.maximum(fitted, coefficients))
            coefficients = fitted
            if settled:
                break
        return [float(c) for c in coefficients]

    def _solve(self, rows: np.ndarray, targets: np.ndarray, scales: np.ndarray, prior_weight: float) -> np.ndarray:
        """Non-negative least squares over the ratios, the prior rows divided by `scales`."""
        n = len(self._prior)
        prior_rows = math.sqrt(prior_weight) * np.diag(1.0 / scales)
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
                if not pinned:
                    # Every coefficient free: no other subset can cost less (each is this problem
                    # with some coefficients held at the floor). The usual case, and one solve
                    # instead of 2^n - 1 (31 for the prefill's 5 terms: ~2.5 ms a prefill step on
                    # the H200 host at 4 reweighting rounds, session 14's step anatomy).
                    break
        return best


def _alike(a: np.ndarray, b: np.ndarray) -> bool:
    """Amounts within 2x of each other, term by term (zero only alike to zero)."""
    return all((x == y == 0) or (x > 0 and y > 0 and 0.5 <= x / y <= 2) for x, y in zip(a, b))


def _subsets(n: int) -> list[list[int]]:
    """Every non-empty subset of range(n), largest first."""
    return [list(free) for size in range(n, 0, -1) for free in itertools.combinations(range(n), size)]
