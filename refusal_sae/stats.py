"""The statistics of the analysis, in one place: bootstrap intervals, the spread of a chance band, the effect of an
intervention, shares of a category's own effect, p-values against random controls, and the transfer summary of a
category x category ablation matrix.

Every F is a weighted sum of per-prompt scores, F = w . s (`refusal_sae.objective`). A bootstrap resample draws,
within each stratum (the toxic and the safe side of a contrast, separately), as many prompts as the stratum holds,
with replacement, and recomputes F = w . (counts * s). The SAME resamples are used for every variant of a circuit
(paired), so a ratio such as faithfulness = (F(C) - F(∅)) / (F(M) - F(∅)) is computed per resample from numbers
that share their noise. Its interval is the percentile interval of those ratios, or (given the statistic's
leave-one-prompt-out jackknife values, `jackknife_weights`) the BCa interval (Efron 1987): the percentiles shifted
by the resamples' median bias z0 and the jackknife's skewness a, which keeps its coverage for the skewed ratios
of differences that 10-40 prompts give, where the percentile interval undercovers (tests/test_stats.py measures
both). A resample whose ratio is not finite (its denominator 0) is dropped and counted in the interval.

A category x category ablation matrix (circuits in `refusal_sae.cross_ablation`, refusal directions in
`refusal_sae.directions`) holds, at [A][B], the effect of ablating A's circuit or direction on B's held-out
prompts. B is testable when its own ablation transfers to itself; over the ordered pairs (A, B) of distinct
testable categories, the mean share(A -> B) = change(A -> B) / change(B -> B) is the summary number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from refusal_sae.objective import Objective

FAITHFUL = 0.8
"""The faithfulness a circuit must reach to be called faithful (Marks et al.; MIB's common bar)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (percentile, or BCa where the jackknife was given)."""

    value: float
    low: float
    high: float
    dropped: int = 0
    """Resamples left out because the statistic was not finite in them (a ratio whose denominator was 0)."""

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def above_zero(self) -> bool:
        """The interval lies above 0 (an effect measurably positive; a NaN bound is not)."""
        return bool(self.low > 0)

    def format(self, spec: str = ".2f") -> str:
        """`value [low, high]`, each number formatted by `spec` (".2f", "+.3f", ".0%", ...)."""
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def wilson(k: int, n: int, confidence: float) -> Interval:
    """k successes of n (n > 0) as a rate with its Wilson score interval (sound at 0/n and n/n, where a
    percentile bootstrap collapses to a point)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def resample_weights(obj: Objective, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, len(obj.rows)) weights W: the resampled F of scores s is W @ s."""
    out = np.zeros((n_resamples, len(obj.rows)))
    for stratum in np.unique(obj.strata):
        idx = np.flatnonzero(obj.strata == stratum)
        counts = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_resamples)
        out[:, idx] = counts * obj.weights[idx]
    return out


def jackknife_weights(obj: Objective) -> np.ndarray:
    """(n, len(obj.rows)) weights J: row i is F with prompt i left out (the rest of its stratum reweighted to keep
    the stratum's total weight), so J @ s are the leave-one-out values BCa's acceleration needs. A stratum of one
    prompt has no leave-one-out value: its prompt gets no row."""
    rows = []
    for stratum in np.unique(obj.strata):
        idx = np.flatnonzero(obj.strata == stratum)
        if len(idx) < 2:
            continue
        for i in idx:
            w = obj.weights.astype(np.float64).copy()
            w[idx] *= len(idx) / (len(idx) - 1)
            w[i] = 0.0
            rows.append(w)
    return np.array(rows).reshape(len(rows), len(obj.rows))


def interval(value: float, resampled: np.ndarray, confidence: float, jackknife: np.ndarray | None = None
             ) -> Interval:
    """The interval of the finite values of `resampled`, the number of the others in `dropped` (a ratio is not
    finite in a resample whose denominator is 0; callers only form ratios whose denominator's interval excludes
    0): BCa given the statistic's `jackknife` values, else percentile."""
    tail = (1 - confidence) / 2
    keep = np.isfinite(resampled)
    finite, dropped = resampled[keep], int(len(resampled) - keep.sum())
    if len(finite) == 0:
        return Interval(float(value), float("nan"), float("nan"), dropped)
    levels = [tail, 1 - tail]
    if jackknife is not None and np.isfinite(value) and np.ptp(finite) > 1e-12 * max(1.0, abs(value)):
        # (resamples that differ only by rounding have no bias or skew to correct: their order is noise)
        levels = _bca_levels(float(value), finite, jackknife[np.isfinite(jackknife)], tail)
    low, high = np.quantile(finite, levels)
    return Interval(float(value), float(low), float(high), dropped)


def _bca_levels(value: float, finite: np.ndarray, jack: np.ndarray, tail: float) -> list[float]:
    """The percentile levels of the BCa interval: z0 from the share of resamples below `value` (ties half), a from
    the jackknife values' skewness; the levels kept within the resamples (1 / 2B from either end)."""
    from scipy.stats import norm

    b = len(finite)
    below = (np.count_nonzero(finite < value) + 0.5 * np.count_nonzero(finite == value)) / b
    z0 = float(norm.ppf(np.clip(below, 1 / (2 * b), 1 - 1 / (2 * b))))
    d = jack.mean() - jack if len(jack) > 1 else np.zeros(1)
    spread = float((d ** 2).sum())
    a = float((d ** 3).sum() / (6 * spread ** 1.5)) if spread > 0 else 0.0
    out = []
    for z in (norm.ppf(tail), norm.ppf(1 - tail)):
        level = float(norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))
        out.append(float(np.clip(level, 1 / (2 * b), 1 - 1 / (2 * b))))
    return out


@dataclass
class Band:
    """Spread of a number over random controls (random circuits of one size, random directions): the chance
    level it is read against."""

    mean: float
    sd: float
    """Sample standard deviation (ddof 1; 0 for one control)."""
    min: float
    max: float


def band(values: Sequence[float] | np.ndarray) -> Band | None:
    """The band of `values`; None when there are none."""
    if len(values) == 0:
        return None
    v = np.asarray(values, dtype=float)
    return Band(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(v.min()), float(v.max()))


@dataclass
class Effect:
    """One intervention (an ablation or an addition) on one category's held-out prompts."""

    score: Interval
    """The prompts' score (mean refusal score, or F) with the intervention."""
    change: Interval
    """Its change from the model's."""
    p_value: float | None = None
    """Ablation against random controls: (1 + controls lowering the score as much) / (1 + their number)."""
    share: Interval | None = None
    """Ablation: change / the category's own ablation's change (null when that one's interval contains 0)."""


def effect(base: np.ndarray, edited: np.ndarray, weights: np.ndarray, confidence: float,
           value: Callable[[np.ndarray], float] = np.mean) -> tuple[Effect, np.ndarray]:
    """The effect of an intervention on prompts scored `base` without and `edited` with it, and its resampled
    changes (`weights`: one bootstrap resample's weights per row); `value` is the point estimate of a score
    vector (the mean, or an objective's F)."""
    change = edited - base
    resampled = weights @ change
    return Effect(interval(float(value(edited)), weights @ edited, confidence),
                  interval(float(value(change)), resampled, confidence)), resampled


def share(own: Interval, own_resampled: np.ndarray, change: Interval, resampled: np.ndarray,
          confidence: float) -> Interval | None:
    """change / own per resample, or None when own's interval contains 0 (never a number divided by noise)."""
    if not own.excludes_zero():
        return None
    return interval(change.value / own.value, resampled / own_resampled, confidence)


def p_below(value: float, random: np.ndarray) -> float:
    """(1 + #{random <= value}) / (1 + len(random)): how often a random control lowers the score as much."""
    return float((1 + np.count_nonzero(random <= value)) / (1 + len(random)))


def p_above(value: float, random: np.ndarray) -> float:
    """(1 + #{random >= value}) / (1 + len(random)): how often a random control reaches `value` (a permutation
    p-value, never 0)."""
    return float((1 + np.count_nonzero(random >= value)) / (1 + len(random)))


def transfers(ablation: Effect, significance: float | None = None) -> bool:
    """The ablation lowers the score: its change's interval lies below 0 and, given a `significance` (there are
    random controls), its p-value is at most that."""
    below = ablation.change.high < 0
    if significance is None:
        return below
    return below and ablation.p_value is not None and ablation.p_value <= significance


@dataclass
class TransferSummary:
    """What a category x category ablation matrix says (module docstring)."""

    tested: list[int]
    """Categories whose own ablation transfers to themselves."""
    pairs: list[tuple[int, int]]
    """Ordered pairs (A, B) of distinct tested categories."""
    n_transfer: int
    """Pairs whose ablation transfers."""
    mean_share: float | None
    """Mean change(A -> B) / change(B -> B) over the pairs; None with fewer than two tested categories."""


def transfer_summary(matrix: Sequence[Sequence[Effect]], significance: float | None = None) -> TransferSummary:
    """The summary of `matrix` ([A][B]: A's ablation on B's prompts), a transfer as `transfers` says."""
    tested = [b for b in range(len(matrix)) if transfers(matrix[b][b], significance)]
    pairs = [(a, b) for a in tested for b in tested if a != b]
    moved = sum(transfers(matrix[a][b], significance) for a, b in pairs)
    if len(tested) < 2:
        return TransferSummary(tested, pairs, int(moved), None)
    shares = np.array([matrix[a][b].change.value / matrix[b][b].change.value for a, b in pairs])
    return TransferSummary(tested, pairs, int(moved), float(shares.mean()))


__all__ = ["Band", "Effect", "Interval", "TransferSummary", "band", "effect", "interval", "jackknife_weights",
           "p_above", "p_below", "resample_weights", "share", "transfer_summary", "transfers"]
