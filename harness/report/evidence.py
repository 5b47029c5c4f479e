"""Statistics a reviewer asks for: Δ with CI and p, Holm across comparisons, power, MDE, seeds needed.

Every comparison is a variant against the baseline on one metric. Seeds pair runs (the seed fixes data
order and initialisation): with at least two shared seeds the test is a paired t on the per-seed
differences, otherwise Welch's t on the two groups. Power is exact for the t test actually used (two-sided,
noncentral t): paired t with the sd of the differences, or the two-sample t with the pooled sd for the
Welch case. Holm's step-down method controls the family-wise error across the comparisons of one
ablation; the corrected interval of a comparison is its t interval at level 1 − α/k, k being the divisor of
its Holm step, so it excludes 0 whenever the Holm-adjusted p is below α.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import optimize
from scipy import stats as st

from harness.report.stats import NO_CI, PAIRED, Delta, delta_vs_baseline, paired_t, welch_t

ALPHA = 0.05
POWER = 0.80
MAX_SEEDS = 1000  # seeds needed beyond this is reported as infinite
BETTER, WORSE, INCONCLUSIVE, TOO_FEW = "better", "worse", "inconclusive", "too few seeds"


@dataclass(frozen=True)
class Evidence(Delta):
    """A variant − baseline comparison (`Delta`'s estimate and CI) with p, Holm, MDE and seeds needed."""

    p: float = math.nan
    sd: float = math.nan  # sd of the per-seed differences (paired) or pooled sd (two-sample)
    mde: float = math.nan  # smallest |Δ| found with 80 % power at this n and sd
    seeds_needed: float = math.nan  # seeds per variant to detect `effect` with 80 % power; inf: beyond MAX_SEEDS
    effect: float = math.nan  # the effect `seeds_needed` is for (|observed Δ| unless stated)
    p_holm: float = math.nan
    holm_k: int = 0
    holm_low: float = math.nan
    holm_high: float = math.nan

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def _finite(values: Mapping[object, float]) -> dict[object, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of `values` and its one-sample t interval (NaN bounds for fewer than 2 values)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    if arr.size < 2:
        return float(arr[0]), math.nan, math.nan
    return paired_t(arr, level)


def power_t(effect_size: float, nobs: float, df: float, alpha: float = ALPHA) -> float:
    """Two-sided power of a t test: noncentrality effect_size·√nobs, `df` degrees of freedom."""
    if df <= 0 or nobs <= 0:
        return math.nan
    crit = float(st.t.isf(alpha / 2, df))
    nc = abs(effect_size) * math.sqrt(nobs)
    upper, lower = float(st.nct.sf(crit, df, nc)), float(st.nct.cdf(-crit, df, nc))
    # scipy's nct returns NaN for the far tail at large noncentrality; that tail is below 1e-12 there
    return (upper if math.isfinite(upper) else 1.0) + (lower if math.isfinite(lower) else 0.0)


def paired_power(effect_size: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the paired (one-sample) t test with `n` pairs at standardized effect Δ/sd_diff."""
    return power_t(effect_size, n, n - 1, alpha)


def two_sample_power(effect_size: float, n1: int, n2: int, alpha: float = ALPHA) -> float:
    """Power of the two-sample t test (pooled sd) with n1 and n2 runs at standardized effect Δ/sd."""
    return power_t(effect_size, n1 * n2 / (n1 + n2), n1 + n2 - 2, alpha)


def _solve_effect(power_of: object, target: float) -> float:
    """The standardized effect where the increasing function `power_of` reaches `target`."""
    high = 1.0
    while power_of(high) < target:  # type: ignore[operator]
        high *= 2
        if high > 1e6:
            return math.inf
    return float(optimize.brentq(lambda d: power_of(d) - target, 1e-9, high, xtol=1e-10))  # type: ignore[operator]


def mde(sd: float, n: int, n2: int | None = None, power: float = POWER, alpha: float = ALPHA) -> float:
    """Minimal detectable |Δ| at `power`: paired with `n` pairs, or two-sample with n and n2 runs."""
    if not math.isfinite(sd) or n < 2 or (n2 is not None and n2 < 2):
        return math.nan
    if n2 is None:
        d = _solve_effect(lambda e: paired_power(e, n, alpha), power)
    else:
        d = _solve_effect(lambda e: two_sample_power(e, n, n2, alpha), power)
    return d * sd


def seeds_needed(effect: float, sd: float, paired: bool = True, power: float = POWER,
                 alpha: float = ALPHA, cap: int = MAX_SEEDS) -> float:
    """Smallest seeds per variant (pairs, or runs per arm) with `power` to detect |effect|; inf beyond `cap`."""
    if not (math.isfinite(effect) and math.isfinite(sd)):
        return math.nan
    if sd == 0:
        return 2.0 if effect != 0 else math.inf
    d = abs(effect) / sd
    if d == 0:
        return math.inf

    def enough(n: int) -> bool:
        return (paired_power(d, n, alpha) if paired else two_sample_power(d, n, n, alpha)) >= power

    if not enough(cap):
        return math.inf
    low, high = 1, 2  # enough(low) is False (no test with one seed), enough(high) decides
    while not enough(high):
        low, high = high, high * 2
        if high >= cap:
            high = cap
            break
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return float(high)


def holm(pvalues: Sequence[float]) -> tuple[list[float], list[int]]:
    """Holm-adjusted p-values and each comparison's step divisor k (NaN p: left out, NaN and 0 back)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    adjusted, divisor = [math.nan] * len(pvalues), [0] * len(pvalues)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: pvalues[j])):
        k = m - rank
        running = max(running, min(1.0, k * float(pvalues[i])))
        adjusted[i], divisor[i] = running, k
    return adjusted, divisor


def _pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ss = x.var(ddof=1) * (x.size - 1) + y.var(ddof=1) * (y.size - 1)
    return math.sqrt(ss / (x.size + y.size - 2))


def compare(variant: Mapping[object, float], baseline: Mapping[object, float],
            effect: float | None = None, level: float = 0.95) -> Evidence:
    """variant − baseline, both {seed: value}: `delta_vs_baseline`'s Δ and CI with p, MDE and seeds needed
    for the same test (no Holm yet)."""
    delta = delta_vs_baseline(variant, baseline, level)
    if delta.method == NO_CI:
        return Evidence(**asdict(delta))
    a, b = _finite(variant), _finite(baseline)
    est = delta.estimate
    if delta.method == PAIRED:
        diffs = [a[s] - b[s] for s in sorted(set(a) & set(b), key=str)]
        sd = float(np.std(diffs, ddof=1))
        p = float(st.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if est != 0 else 1.0)
        detectable, paired = mde(sd, delta.n), True
    else:
        xa, xb = list(a.values()), list(b.values())
        sd = _pooled_sd(xa, xb)
        p = float(st.ttest_ind(xa, xb, equal_var=False).pvalue) if sd > 0 else (0.0 if est != 0 else 1.0)
        detectable, paired = mde(sd, len(a), len(b)), False
    target = abs(est) if effect is None else abs(effect)
    return Evidence(**asdict(delta), p=p, sd=sd, mde=detectable, seeds_needed=seeds_needed(target, sd, paired=paired),
                    effect=target)


def compare_family(pairs: Sequence[tuple[Mapping[object, float], Mapping[object, float]]],
                   effect: float | None = None, alpha: float = ALPHA) -> list[Evidence]:
    """`compare` for each (variant, baseline) pair, then Holm across them with corrected intervals."""
    found = [compare(v, b, effect) for v, b in pairs]
    adjusted, divisors = holm([e.p for e in found])
    out = []
    for (v, b), e, p_holm, k in zip(pairs, found, adjusted, divisors, strict=True):
        if k == 0:
            out.append(e)
            continue
        level = 1 - alpha / k
        a, base = _finite(v), _finite(b)
        if e.method == PAIRED:
            shared = sorted(set(a) & set(base), key=str)
            _, lo, hi = paired_t([a[s] - base[s] for s in shared], level)
        else:
            _, lo, hi = welch_t(list(a.values()), list(base.values()), level)
        out.append(replace(e, p_holm=p_holm, holm_k=k, holm_low=lo, holm_high=hi))
    return out


def verdict(e: Evidence, higher_is_better: bool = True, alpha: float = ALPHA) -> str:
    """BETTER / WORSE only when the Holm p < α and the corrected interval excludes 0; else why not."""
    if not e.has_interval:
        return TOO_FEW
    if math.isfinite(e.p_holm) and e.p_holm < alpha and (e.holm_low > 0 or e.holm_high < 0):
        return BETTER if (e.holm_low > 0) == higher_is_better else WORSE
    return INCONCLUSIVE


def above_chance(values: Mapping[object, float], chance: Mapping[object, float]) -> tuple[float, float, bool]:
    """Per-run (value − chance): 95 % interval bounds and whether it is not better than chance.

    "Not better than chance" when the interval reaches 0 or below; with one run, when value ≤ chance.
    """
    a, c = _finite(values), _finite(chance)
    diffs = [a[k] - c[k] for k in a if k in c]
    if not diffs:
        return math.nan, math.nan, False
    mean, lo, hi = t_interval(diffs)
    if not math.isfinite(lo):
        return lo, hi, mean <= 0
    return lo, hi, lo <= 0


def curve_area(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under y(x) by trapezoids, divided by the x range: the curve's mean value over the range."""
    pts = sorted((float(a), float(b)) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b))
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return math.nan
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))
