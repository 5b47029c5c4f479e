"""harness.report.stats against scipy's own t-tests and hand-computed numbers."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats as st

from harness.report.stats import NO_CI, PAIRED, WELCH, delta_vs_baseline, mean_std, paired_t, welch_t


def test_mean_std_matches_statistics_and_skips_nan() -> None:
    values = [0.31, 0.35, 0.29, float("nan"), None]
    mean, std, n = mean_std(values)  # type: ignore[arg-type]
    assert n == 3
    assert mean == pytest.approx(statistics.mean([0.31, 0.35, 0.29]))
    assert std == pytest.approx(statistics.stdev([0.31, 0.35, 0.29]))
    assert math.isnan(mean_std([0.4])[1]) and mean_std([0.4])[0] == 0.4
    assert mean_std([])[2] == 0


def test_paired_t_matches_scipy() -> None:
    a, b = [0.52, 0.55, 0.50, 0.57], [0.50, 0.51, 0.49, 0.52]
    est, lo, hi = paired_t([x - y for x, y in zip(a, b, strict=True)])
    ci = st.ttest_rel(a, b).confidence_interval(0.95)
    assert est == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert (lo, hi) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_welch_matches_scipy() -> None:
    a, b = [0.52, 0.55, 0.50], [0.50, 0.41, 0.49, 0.45, 0.47]
    est, lo, hi = welch_t(a, b)
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert est == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert (lo, hi) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_delta_pairs_by_shared_seeds() -> None:
    variant = {1: 0.60, 2: 0.62, 3: 0.58, 7: 0.99}  # seed 7 has no partner: left out of the paired Δ
    baseline = {1: 0.55, 2: 0.56, 3: 0.57, 4: 0.10}
    d = delta_vs_baseline(variant, baseline)
    diffs = [0.05, 0.06, 0.01]
    ci = st.ttest_rel([0.60, 0.62, 0.58], [0.55, 0.56, 0.57]).confidence_interval()
    assert d.method == PAIRED and d.n == 3
    assert d.estimate == pytest.approx(statistics.mean(diffs))
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_delta_falls_back_to_welch_without_shared_seeds() -> None:
    d = delta_vs_baseline({1: 0.6, 2: 0.7}, {3: 0.5, 4: 0.52, 5: 0.49})
    ci = st.ttest_ind([0.6, 0.7], [0.5, 0.52, 0.49], equal_var=False).confidence_interval()
    assert d.method == WELCH and (d.n, d.n_baseline) == (2, 3)
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert d.significant == (ci.low > 0 or ci.high < 0)


def test_delta_without_enough_runs_has_no_interval() -> None:
    d = delta_vs_baseline({1: 0.6}, {1: 0.5, 2: 0.52})  # one shared seed, one variant run
    assert d.method == NO_CI and d.estimate == pytest.approx(0.6 - 0.51)
    assert math.isnan(d.low) and not d.significant
    assert math.isnan(delta_vs_baseline({}, {1: 0.5}).estimate)


def test_delta_of_baseline_with_itself_is_zero() -> None:
    x = {1: 0.5, 2: 0.55, 3: 0.53}
    d = delta_vs_baseline(x, x)
    assert (d.estimate, d.low, d.high, d.method) == (0.0, 0.0, 0.0, PAIRED)


# --- edge cases that mutation testing (scripts/mutation.sh) showed unpinned -----------------------------


def test_mean_std_of_two_values() -> None:
    mean, std, n = mean_std([0.5, 0.7])
    assert (mean, n) == (pytest.approx(0.6), 2) and std == pytest.approx(statistics.stdev([0.5, 0.7]))


def test_welch_with_no_spread_is_a_point() -> None:
    assert welch_t([0.7, 0.7], [0.5, 0.5]) == pytest.approx((0.2, 0.2, 0.2))


def test_delta_with_two_runs_a_side() -> None:
    paired = delta_vs_baseline({1: 0.6, 2: 0.7}, {1: 0.5, 2: 0.55})  # two shared seeds are enough to pair
    ci = st.ttest_rel([0.6, 0.7], [0.5, 0.55]).confidence_interval()
    assert (paired.method, paired.n, paired.n_baseline) == (PAIRED, 2, 2)
    assert (paired.estimate, paired.low, paired.high) == pytest.approx((0.125, ci.low, ci.high))
    welch = delta_vs_baseline({1: 0.6, 2: 0.7}, {3: 0.5, 4: 0.55})  # two runs each side, none shared
    ci = st.ttest_ind([0.6, 0.7], [0.5, 0.55], equal_var=False).confidence_interval()
    assert (welch.method, welch.n, welch.n_baseline) == (WELCH, 2, 2)
    assert (welch.estimate, welch.low, welch.high) == pytest.approx((0.125, ci.low, ci.high))


@pytest.mark.parametrize("level", [0.9, 0.99])
def test_delta_honours_the_level(level: float) -> None:
    a, b = [0.60, 0.62, 0.58], [0.55, 0.56, 0.57]
    paired = delta_vs_baseline(dict(enumerate(a)), dict(enumerate(b)), level)
    ci = st.ttest_rel(a, b).confidence_interval(level)
    assert (paired.low, paired.high) == pytest.approx((ci.low, ci.high))
    welch = delta_vs_baseline({1: 0.6, 2: 0.7}, {3: 0.5, 4: 0.52, 5: 0.49}, level)
    ci = st.ttest_ind([0.6, 0.7], [0.5, 0.52, 0.49], equal_var=False).confidence_interval(level)
    assert (welch.low, welch.high) == pytest.approx((ci.low, ci.high))


def test_delta_leaves_out_non_finite_values() -> None:
    d = delta_vs_baseline({1: 0.6, 2: float("nan"), 3: 0.7, 4: float("inf")}, {1: 0.5, 2: 0.4, 3: 0.55})
    assert (d.method, d.n) == (PAIRED, 2) and d.estimate == pytest.approx(0.125)


def _fields(d) -> tuple:
    return tuple("nan" if isinstance(v, float) and math.isnan(v) else v
                 for v in (d.estimate, d.low, d.high, d.method, d.n, d.n_baseline))


def test_delta_without_an_interval_reports_every_field() -> None:
    assert _fields(delta_vs_baseline({}, {1: 0.5})) == ("nan", "nan", "nan", NO_CI, 0, 1)
    assert _fields(delta_vs_baseline({1: 0.5, 2: 0.6}, {})) == ("nan", "nan", "nan", NO_CI, 2, 0)
    one = delta_vs_baseline({1: 0.6}, {1: 0.5, 2: 0.52})
    assert _fields(one)[1:] == ("nan", "nan", NO_CI, 1, 2) and one.estimate == pytest.approx(0.09)
