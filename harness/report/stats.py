"""Small statistics for the report: mean ± std over seeds and Δ against the baseline with a 95% CI.

Δ pairs runs by seed where it can: when the variant and the baseline share at least two seeds, the CI is
a paired t interval over the shared seeds (the seed fixes data order and initialisation, so pairing removes
that noise). Otherwise, with at least two runs on each side, it is Welch's t interval for a difference of
means. With fewer runs there is no interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

PAIRED = "paired t"
WELCH = "Welch t"
NO_CI = "no CI"


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for fewer than 2 values) and count of finite values."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(arr.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else math.nan
    return mean, std, n


@dataclass(frozen=True)
class Delta:
    """Difference of means (variant − baseline) with a confidence interval."""

    estimate: float
    low: float
    high: float
    method: str  # PAIRED, WELCH or NO_CI
    n: int  # pairs for a paired interval, else runs of the variant
    n_baseline: int  # pairs for a paired interval, else runs of the baseline

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)


def paired_t(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of `diffs` and its t confidence interval (n ≥ 2)."""
    d = np.asarray(diffs, dtype=float)
    n = d.size
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * se
    return mean, mean - half, mean + half


def welch_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) − mean(b) and Welch's t confidence interval (each side n ≥ 2)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = float(x.mean() - y.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    half = float(_st.t.ppf(0.5 + level / 2, df)) * se
    return diff, diff - half, diff + half


def _finite(values: Mapping[object, float]) -> dict[object, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def delta_vs_baseline(
    variant: Mapping[object, float], baseline: Mapping[object, float], level: float = 0.95
) -> Delta:
    """Δ = mean(variant) − mean(baseline), both given as {seed: value}; see the module docstring."""
    a, b = _finite(variant), _finite(baseline)
    if not a or not b:
        return Delta(math.nan, math.nan, math.nan, NO_CI, len(a), len(b))
    shared = sorted(set(a) & set(b), key=str)
    if len(shared) >= 2:
        est, lo, hi = paired_t([a[s] - b[s] for s in shared], level)
        return Delta(est, lo, hi, PAIRED, len(shared), len(shared))
    est = float(np.mean(list(a.values())) - np.mean(list(b.values())))
    if len(a) >= 2 and len(b) >= 2:
        est, lo, hi = welch_t(list(a.values()), list(b.values()), level)
        return Delta(est, lo, hi, WELCH, len(a), len(b))
    return Delta(est, math.nan, math.nan, NO_CI, len(a), len(b))
