"""The shared statistics against reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from refusal_sae.stats import band, wilson


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
