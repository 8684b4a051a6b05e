"""The shared statistics against reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap

from refusal_sae.objective import Objective
from refusal_sae.stats import band, interval, jackknife_weights, resample_weights, wilson


@pytest.mark.parametrize("k, n", [(0, 4), (4, 4), (3, 12), (7, 9), (1, 1), (50, 200)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_wilson_interval_is_scipys(k: int, n: int, confidence: float) -> None:
    got = wilson(k, n, confidence)
    want = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert got.value == k / n
    assert (got.low, got.high) == pytest.approx((want.low, want.high), abs=1e-12)


def test_band_spread_is_the_sample_standard_deviation() -> None:
    values = [0.1, 0.4, 0.2, 0.9]
    got = band(values)
    assert got.sd == pytest.approx(float(np.std(values, ddof=1)))
    assert band([]) is None


def mean_objective(n: int) -> Objective:
    return Objective(np.arange(n), np.full(n, 1.0 / n), np.ones(n, dtype=int))


def test_jackknife_rows_leave_one_prompt_out_within_its_stratum() -> None:
    """For a contrast (mean of one side minus the other's), row i is the contrast without prompt i."""
    rng = np.random.default_rng(0)
    s, strata = rng.normal(size=9), np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    obj = Objective(np.arange(9), np.where(strata == 1, 1 / 4, -1 / 5), strata)
    got = jackknife_weights(obj) @ s
    want = []
    for i in range(9):
        keep = np.arange(9) != i
        pos, neg = keep & (strata == 1), keep & (strata == 0)
        want.append(s[pos].mean() - s[neg].mean())
    assert sorted(got) == pytest.approx(sorted(want), abs=1e-12)
    assert jackknife_weights(Objective(np.arange(3), np.array([1.0, -0.5, -0.5]), np.array([1, 0, 0]))).shape == (2, 3)


def test_bca_interval_is_scipys_on_a_skewed_mean() -> None:
    """Same data, many resamples each: the BCa endpoints agree with scipy.stats.bootstrap's BCa within Monte Carlo
    error, and both sit right of the percentile interval (the mean of skewed data is right-skewed)."""
    data = np.random.default_rng(1).exponential(size=12)
    obj = mean_objective(12)
    w = resample_weights(obj, 40_000, np.random.default_rng(2))
    got = interval(float(data.mean()), w @ data, 0.95, jackknife_weights(obj) @ data)
    plain = interval(float(data.mean()), w @ data, 0.95)
    want = bootstrap((data,), np.mean, n_resamples=40_000, method="BCa", random_state=3).confidence_interval
    assert (got.low, got.high) == pytest.approx((want.low, want.high), rel=0.02)
    assert got.low > plain.low and got.high > plain.high


def test_bca_covers_a_skewed_mean_better_than_the_percentile_interval() -> None:
    """2,000 samples of 10 exponential values (true mean 1): the percentile interval misses above far more often
    than its 2.5%; BCa's misses are fewer and its coverage nearer 95%."""
    rng = np.random.default_rng(4)
    obj = mean_objective(10)
    w, jack = resample_weights(obj, 2000, rng), jackknife_weights(obj)
    miss = {"percentile": [0, 0], "bca": [0, 0]}
    for _ in range(2000):
        data = rng.exponential(size=10)
        for name, j in (("percentile", None), ("bca", jack @ data)):
            ci = interval(float(data.mean()), w @ data, 0.95, j)
            miss[name][0] += ci.low > 1.0
            miss[name][1] += ci.high < 1.0
    assert miss["bca"][1] < miss["percentile"][1]
    assert abs(sum(miss["bca"]) / 2000 - 0.05) < abs(sum(miss["percentile"]) / 2000 - 0.05)


def test_resamples_where_a_ratio_is_undefined_are_dropped_and_counted() -> None:
    got = interval(1.0, np.array([0.5, np.inf, 1.5, np.nan, 1.0]), 0.95)
    assert got.dropped == 2 and 0.5 <= got.low < got.high <= 1.5
    assert interval(1.0, np.array([np.nan]), 0.95).dropped == 1
