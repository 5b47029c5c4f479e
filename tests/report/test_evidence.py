"""harness.report.evidence against scipy and statsmodels on fixed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from harness.report.evidence import (
    BETTER,
    INCONCLUSIVE,
    TOO_FEW,
    WORSE,
    above_chance,
    compare,
    compare_family,
    curve_area,
    holm,
    mde,
    paired_power,
    seeds_needed,
    t_interval,
    two_sample_power,
    verdict,
)
from harness.report.stats import NO_CI, PAIRED, WELCH

BASE = {1: 0.500, 2: 0.512, 3: 0.495, 4: 0.507}


def test_t_interval_matches_scipy() -> None:
    values = [0.41, 0.44, 0.39, 0.47, 0.43]
    mean, lo, hi = t_interval(values)
    ref = st.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=st.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (lo, hi) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert math.isnan(t_interval([0.4])[1]) and t_interval([0.4])[0] == 0.4


def test_holm_matches_statsmodels() -> None:
    p = [0.01, 0.04, 0.03, 0.2, 0.005, 0.049]
    adjusted, divisors = holm(p)
    assert adjusted == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert sorted(divisors) == [1, 2, 3, 4, 5, 6] and divisors[4] == 6  # the smallest p is divided by m
    with_nan, k = holm([0.02, math.nan, 0.01])
    assert with_nan[0] == pytest.approx(multipletests([0.02, 0.01], method="holm")[1][0]) and math.isnan(with_nan[1])
    assert k == [1, 0, 2]


@pytest.mark.parametrize("effect, n", [(0.5, 10), (1.2, 4), (2.5, 3), (0.8, 25)])
def test_paired_power_matches_statsmodels(effect: float, n: int) -> None:
    assert paired_power(effect, n) == pytest.approx(TTestPower().power(effect, n, 0.05), rel=1e-6)


@pytest.mark.parametrize("effect, n1, n2", [(0.5, 10, 10), (1.2, 4, 6), (2.0, 3, 3)])
def test_two_sample_power_matches_statsmodels(effect: float, n1: int, n2: int) -> None:
    ref = TTestIndPower().power(effect, n1, 0.05, ratio=n2 / n1)
    assert two_sample_power(effect, n1, n2) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_mde_matches_statsmodels(n: int) -> None:
    sd = 0.02
    d_paired = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8)
    assert mde(sd, n) == pytest.approx(d_paired * sd, rel=1e-4)
    d_ind = TTestIndPower().solve_power(nobs1=n, alpha=0.05, power=0.8, ratio=(n + 1) / n)
    assert mde(sd, n, n + 1) == pytest.approx(d_ind * sd, rel=1e-4)
    assert math.isnan(mde(sd, 1)) and math.isnan(mde(math.nan, 5))


@pytest.mark.parametrize("effect, sd", [(0.01, 0.02), (0.03, 0.02), (0.005, 0.01)])
def test_seeds_needed_is_the_first_n_with_80_percent_power(effect: float, sd: float) -> None:
    need = seeds_needed(effect, sd, paired=True)
    exact = TTestPower().solve_power(effect_size=effect / sd, alpha=0.05, power=0.8)
    assert need == math.ceil(exact)
    need2 = seeds_needed(effect, sd, paired=False)
    exact2 = TTestIndPower().solve_power(effect_size=effect / sd, alpha=0.05, power=0.8, ratio=1.0)
    assert need2 == math.ceil(exact2)
    assert seeds_needed(0.0, sd) == math.inf and seeds_needed(1e-6, 1.0) == math.inf  # beyond MAX_SEEDS


def test_compare_paired_p_and_interval_match_scipy() -> None:
    variant = {1: 0.530, 2: 0.525, 3: 0.541, 4: 0.520, 9: 0.9}  # seed 9 has no partner
    e = compare(variant, BASE)
    a, b = [variant[s] for s in (1, 2, 3, 4)], [BASE[s] for s in (1, 2, 3, 4)]
    ref = st.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert e.method == PAIRED and e.n == 4
    assert e.p == pytest.approx(ref.pvalue) and (e.low, e.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert e.sd == pytest.approx(np.std(np.subtract(a, b), ddof=1))
    assert e.effect == pytest.approx(abs(e.estimate))


def test_compare_welch_without_shared_seeds() -> None:
    variant = {11: 0.53, 12: 0.55, 13: 0.52}
    e = compare(variant, BASE)
    ref = st.ttest_ind(list(variant.values()), list(BASE.values()), equal_var=False)
    assert e.method == WELCH and e.p == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (e.low, e.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    pooled = math.sqrt((2 * np.var(list(variant.values()), ddof=1) + 3 * np.var(list(BASE.values()), ddof=1)) / 5)
    d = TTestIndPower().solve_power(effect_size=None, nobs1=3, alpha=0.05, power=0.8, ratio=4 / 3)
    assert e.mde == pytest.approx(pooled * d, rel=1e-4)


def test_one_seed_gives_no_interval_and_no_verdict() -> None:
    e = compare({1: 0.6}, {1: 0.5})
    assert e.method == NO_CI and not e.has_interval and math.isnan(e.mde)
    assert verdict(e) == TOO_FEW


def test_holm_corrected_interval_and_the_winner_rule() -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):  # random families: a winner never has a corrected interval that includes 0
        pairs = []
        for shift in rng.normal(0, 0.01, size=4):
            base = {s: 0.5 + rng.normal(0, 0.01) for s in range(4)}
            pairs.append(({s: v + shift + rng.normal(0, 0.01) for s, v in base.items()}, base))
        for e in compare_family(pairs):
            assert 1 <= e.holm_k <= 4
            if verdict(e) in (BETTER, WORSE):
                assert e.p_holm < 0.05 and (e.holm_low > 0 or e.holm_high < 0)
            else:
                assert e.p_holm >= 0.05 or e.holm_low <= 0 <= e.holm_high
            assert e.holm_low <= e.low and e.holm_high >= e.high  # wider than the plain interval


def test_corrected_interval_is_the_t_interval_at_the_holm_level() -> None:
    a = {1: 0.56, 2: 0.57, 3: 0.55, 4: 0.58}
    c = {1: 0.51, 2: 0.50, 3: 0.52, 4: 0.51}
    strong, weak = compare_family([(a, BASE), (c, BASE)])
    assert strong.holm_k == 2 and weak.holm_k == 1  # the smaller p is divided by 2
    diffs = [a[s] - BASE[s] for s in BASE]
    half = st.t.ppf(1 - 0.05 / 2 / 2, 3) * st.sem(diffs)
    assert (strong.holm_low, strong.holm_high) == (pytest.approx(np.mean(diffs) - half),
                                                   pytest.approx(np.mean(diffs) + half))
    assert strong.p_holm == pytest.approx(multipletests([strong.p, weak.p], method="holm")[1][0])
    assert verdict(strong) == BETTER and verdict(weak) == INCONCLUSIVE
    assert verdict(strong, higher_is_better=False) == WORSE


def test_above_chance() -> None:
    chance = {1: 0.30, 2: 0.30, 3: 0.30}
    assert above_chance({1: 0.50, 2: 0.52, 3: 0.49}, chance)[2] is False
    lo, hi, flagged = above_chance({1: 0.29, 2: 0.33, 3: 0.31}, chance)
    assert flagged and lo < 0 < hi
    assert above_chance({1: 0.29}, chance)[2] and not above_chance({1: 0.5}, chance)[2]
    assert above_chance({1: 0.5}, {})[2] is False  # no chance logged: no flag


def test_curve_area_is_the_mean_over_the_range() -> None:
    assert curve_area([0, 30, 90], [0.6, 0.5, 0.2]) == pytest.approx((0.55 * 30 + 0.35 * 60) / 90)
    assert curve_area([90, 0, 30], [0.2, 0.6, 0.5]) == pytest.approx(curve_area([0, 30, 90], [0.6, 0.5, 0.2]))
    assert math.isnan(curve_area([1], [0.5]))
