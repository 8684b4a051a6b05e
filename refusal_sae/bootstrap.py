"""Paired, stratified bootstrap of F over prompts: intervals for F, for ratios of F, and for curve areas.

Every F is a weighted sum of per-prompt scores, F = w . s (`refusal_sae.objective`). A resample draws,
within each stratum (the toxic and the safe side of a contrast, separately), as many prompts as the
stratum holds, with replacement, and recomputes F = w . (counts * s). The SAME resamples are used for
every variant of a circuit (paired), so a ratio such as faithfulness = (F(C) - F(∅)) / (F(M) - F(∅))
is computed per resample from numbers that share their noise, and its interval is the percentile
interval of those ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refusal_sae.objective import Objective


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def resample_weights(obj: Objective, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, len(obj.rows)) weights W: the resampled F of scores s is W @ s."""
    out = np.zeros((n_resamples, len(obj.rows)))
    for stratum in np.unique(obj.strata):
        idx = np.flatnonzero(obj.strata == stratum)
        counts = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_resamples)
        out[:, idx] = counts * obj.weights[idx]
    return out


def interval(value: float, resampled: np.ndarray, confidence: float) -> Interval:
    """Percentile interval of the finite values of `resampled` (a ratio is not finite in a resample whose
    denominator is 0; callers only form ratios whose denominator's interval excludes 0)."""
    tail = (1 - confidence) / 2
    finite = resampled[np.isfinite(resampled)]
    if len(finite) == 0:
        return Interval(float(value), float("nan"), float("nan"))
    low, high = np.quantile(finite, [tail, 1 - tail])
    return Interval(float(value), float(low), float(high))


__all__ = ["Interval", "interval", "resample_weights"]
