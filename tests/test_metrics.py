"""Multi-label metrics against hand-computed values and scikit-learn (a dev dependency)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from harness.metrics import (
    HIGHER_IS_BETTER,
    average_precision,
    label_prior_metrics,
    mean_average_precision,
    multilabel_metrics,
)


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    targets = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    # positives at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision(scores, targets).item() == pytest.approx((1 + 2 / 3) / 2)


def test_class_without_positive_is_left_out_of_map():
    scores = torch.tensor([[0.9, 0.2], [0.1, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    ap = average_precision(scores, targets)
    assert ap[0].item() == 1.0 and ap[1].isnan()
    assert multilabel_metrics(scores, targets)["map"] == 1.0


def test_threshold_metrics_by_hand():
    # 3 samples x 3 classes
    scores = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8], [0.6, 0.1, 0.2]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    m = multilabel_metrics(scores, targets)
    # predictions: class0 {s0, s2} tp=1; class1 {s0, s1} tp=1; class2 {s1} tp=1 ; n_true = 1, 1, 2
    tp, n_pred, n_true = 3, 5, 4
    assert m["micro_precision"] == pytest.approx(tp / n_pred)
    assert m["micro_recall"] == pytest.approx(tp / n_true)
    assert m["micro_f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    p = [1 / 2, 1 / 2, 1.0]
    r = [1.0, 1.0, 1 / 2]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r, strict=True)]
    assert m["macro_precision"] == pytest.approx(sum(p) / 3)
    assert m["macro_recall"] == pytest.approx(sum(r) / 3)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    cp, cr = sum(p) / 3, sum(r) / 3
    assert m["cp"] == pytest.approx(cp) and m["cr"] == pytest.approx(cr)
    assert m["cf1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert (m["op"], m["or"], m["of1"]) == (m["micro_precision"], m["micro_recall"], m["micro_f1"])
    assert set(m) == set(HIGHER_IS_BETTER) - {"loss"}  # every metric has a direction, nothing else is reported


def test_perfect_and_empty_predictions():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    perfect = multilabel_metrics(targets.clone(), targets)
    assert perfect["map"] == perfect["micro_f1"] == perfect["macro_f1"] == 1.0
    nothing = multilabel_metrics(torch.zeros(2, 2), targets)
    assert nothing["micro_precision"] == 0.0 and nothing["micro_f1"] == 0.0 and nothing["cp"] == 0.0


# --- against scikit-learn -------------------------------------------------------------------------------
# AP is scikit-learn's `average_precision_score` per class (step-wise, ties enter the curve together);
# mAP leaves classes without a positive out. Macro P/F1 count the classes that occur or were predicted,
# macro recall the classes that occur; a label is predicted at `score >= threshold`.

TOL = 1e-6


def _sklearn_ap(scores: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """scikit-learn's AP per class; NaN for a class without a positive (where sklearn warns and gives 0)."""
    s, t = scores.double().numpy(), targets.numpy()
    return np.array([skm.average_precision_score(t[:, j], s[:, j]) if t[:, j].any() else np.nan
                     for j in range(t.shape[1])])


def _assert_ap_matches_sklearn(scores: torch.Tensor, targets: torch.Tensor) -> None:
    ours = average_precision(scores, targets).numpy()
    ref = _sklearn_ap(scores, targets)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL, equal_nan=True)
    if not np.isnan(ref).all():
        assert multilabel_metrics(scores, targets)["map"] == pytest.approx(np.nanmean(ref), abs=TOL)


def _random_case(seed: int, n: int, c: int, rate: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < rate).float()
    scores = torch.sigmoid(torch.randn(n, c, generator=g) * 2 + targets)  # informative, not perfect
    return scores, targets


@pytest.mark.parametrize("seed,n,c", [(0, 50, 5), (1, 200, 12), (2, 7, 3), (3, 1000, 4)])
def test_ap_matches_sklearn_on_random_scores(seed, n, c):
    _assert_ap_matches_sklearn(*_random_case(seed, n, c))


@pytest.mark.parametrize("seed", range(4))
def test_ap_matches_sklearn_on_scores_rounded_to_one_decimal(seed):
    scores, targets = _random_case(seed, 300, 6)
    scores = (scores * 10).round() / 10  # 11 distinct values: every group is a tie
    assert scores.unique().numel() <= 11
    _assert_ap_matches_sklearn(scores, targets)


@pytest.mark.parametrize("seed", range(4))
def test_ap_matches_sklearn_on_bf16_logits(seed):
    """Scores as evaluation under bf16 autocast makes them: bf16 logits (8 significant bits), sigmoid in fp32."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(5000, 8, generator=g) < 0.1).float()
    logits = (torch.randn(5000, 8, generator=g) * 2 + 2 * targets).bfloat16()
    scores = torch.sigmoid(logits.float())
    assert scores[:, 0].unique().numel() < 2500  # many ties: fewer distinct scores than half the rows
    _assert_ap_matches_sklearn(scores, targets)


def test_ap_does_not_depend_on_the_order_of_tied_rows():
    scores, targets = _random_case(5, 400, 5)
    scores = (scores * 5).round() / 5
    base = average_precision(scores, targets)
    for seed in range(3):
        perm = torch.randperm(400, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(average_precision(scores[perm], targets[perm]), base, rtol=0, atol=1e-12)


def test_ap_ties_by_hand():
    # groups (descending): {0.9: neg} → P=0/1 R=0; {0.5: pos, neg} → P=1/3 R=1/2; {0.1: pos} → P=2/4 R=1
    scores = torch.tensor([[0.9], [0.5], [0.5], [0.1]])
    targets = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    assert average_precision(scores, targets).item() == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)
    # all scores equal: one group, AP = the positive rate, whatever the row order
    for first in range(4):
        t = torch.zeros(4, 1)
        t[first] = 1
        assert average_precision(torch.full((4, 1), 0.7), t).item() == pytest.approx(0.25)
        assert skm.average_precision_score(t[:, 0].numpy(), np.full(4, 0.7)) == pytest.approx(0.25)


def test_degenerate_inputs_match_sklearn():
    # a single row: AP 1 for a positive, undefined (NaN, left out of mAP) for a negative
    one = average_precision(torch.tensor([[0.3, 0.8]]), torch.tensor([[1.0, 0.0]]))
    assert one[0].item() == 1.0 and one[1].isnan()
    _assert_ap_matches_sklearn(torch.tensor([[0.3, 0.8, 0.5]]), torch.tensor([[1.0, 0.0, 1.0]]))
    # all-equal scores in every class, a class without positives, a class with only positives
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    _assert_ap_matches_sklearn(torch.full((5, 3), 0.5), targets)
    _assert_ap_matches_sklearn(torch.zeros(5, 3), targets)
    ap = average_precision(torch.full((5, 3), 0.5), targets)
    assert ap[0].item() == pytest.approx(0.4) and ap[1].isnan() and ap[2].item() == 1.0
    # no rows at all: every AP undefined, mAP 0
    empty = average_precision(torch.zeros(0, 2), torch.zeros(0, 2))
    assert empty.shape == (2,) and empty.dtype == torch.float64 and empty.isnan().all()
    no_positive = mean_average_precision(torch.zeros(0, 2), torch.zeros(0, 2))
    assert no_positive.dtype == torch.float64 and no_positive.item() == 0.0


def test_map_leaves_out_classes_without_positives():
    """sklearn's macro average counts such a class as AP 0 (with a warning); our mAP leaves it out."""
    scores, targets = _random_case(7, 60, 4)
    targets[:, 2] = 0
    ref = _sklearn_ap(scores, targets)
    m = multilabel_metrics(scores, targets)["map"]
    assert m == pytest.approx(np.mean(ref[[0, 1, 3]]), abs=TOL)
    with pytest.warns(UserWarning, match="No positive class"):
        sk_macro = skm.average_precision_score(targets.numpy(), scores.double().numpy(), average="macro")
    assert sk_macro == pytest.approx(np.sum(ref[[0, 1, 3]]) / 4, abs=TOL) and abs(m - sk_macro) > 0.1
    assert multilabel_metrics(scores, torch.zeros_like(targets))["map"] == 0.0  # no class has a positive


# --- threshold metrics ----------------------------------------------------------------------------------


def _macro_case() -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows x 5 classes, predictions at 0.5. Class 0: tp 1, fp 1, fn 0. Class 1: occurs twice, never
    predicted. Class 2: predicted once, never occurs. Class 3: neither occurs nor is predicted. Class 4:
    tp 1, fp 0, fn 1."""
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.0, 0.8],
        [0.7, 0.4, 0.6, 0.1, 0.3],
        [0.2, 0.3, 0.1, 0.2, 0.1],
        [0.1, 0.2, 0.4, 0.3, 0.2],
    ])
    targets = torch.tensor([
        [1.0, 0.0, 0.0, 0.0, 1.0],
        [0.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    return scores, targets


def test_macro_averages_by_hand():
    m = multilabel_metrics(*_macro_case())
    # per class (0, 1, 2, 4): precision 1/2, 0, 0, 1; recall 1, 0, -, 1/2; F1 2/3, 0, 0, 2/3
    # precision and F1 average over the classes that occur or were predicted (0, 1, 2, 4: the predicted
    # but absent class 2 counts as 0), recall over the classes that occur (0, 1, 4); class 3 is in none
    assert m["macro_precision"] == pytest.approx((1 / 2 + 0 + 0 + 1) / 4)
    assert m["macro_recall"] == pytest.approx((1 + 0 + 1 / 2) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 0 + 2 / 3) / 4)
    # micro: tp 2, predicted 4, true 5
    assert (m["micro_precision"], m["micro_recall"], m["micro_f1"]) == pytest.approx((1 / 2, 2 / 5, 4 / 9))
    # ML-GCN's CP/CR over the classes that occur (0, 1, 4)
    assert m["cp"] == pytest.approx((1 / 2 + 0 + 1) / 3) and m["cr"] == pytest.approx((1 + 0 + 1 / 2) / 3)


def _threshold_case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "by_hand":
        return _macro_case()
    scores, targets = _random_case(11, 40, 6, rate=0.15)
    if name == "absent_and_unpredicted":
        targets[:, 1] = 0  # a class that never occurs (but is predicted in some rows)
        scores[:, 5] = 0.0  # a class that occurs but is never predicted
    return scores, targets


@pytest.mark.parametrize("case", ["by_hand", "random", "absent_and_unpredicted"])
def test_threshold_metrics_match_sklearn(case):
    scores, targets = _threshold_case(case)
    m = multilabel_metrics(scores, targets)
    y_true, y_pred = targets.numpy().astype(int), (scores.numpy() >= 0.5).astype(int)
    present = np.flatnonzero(y_true.sum(0) > 0)
    counted = np.flatnonzero((y_true.sum(0) > 0) | (y_pred.sum(0) > 0))
    p, _, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=counted, average="macro", zero_division=0)
    _, r, _, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f), abs=TOL)
    micro = skm.precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)[:3]
    assert (m["micro_precision"], m["micro_recall"], m["micro_f1"]) == pytest.approx(micro, abs=TOL)


@pytest.mark.parametrize("predicted", [False, True])
def test_no_label_anywhere_gives_zeros_not_nan(predicted):
    """A batch without a single positive label (with or without predictions): every average is 0."""
    scores = torch.full((3, 4), 0.9 if predicted else 0.1)
    m = multilabel_metrics(scores, torch.zeros(3, 4))
    assert m == dict.fromkeys(m, 0.0)


def test_score_at_the_threshold_is_a_prediction():
    scores = torch.tensor([[0.5, 0.25], [0.49, 0.75]])
    targets = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    at_half = multilabel_metrics(scores, targets)  # predicted: (0, 0) at exactly 0.5, (1, 1)
    assert (at_half["micro_precision"], at_half["micro_recall"]) == pytest.approx((1 / 2, 1 / 3))
    at_quarter = multilabel_metrics(scores, targets, threshold=0.25)  # adds (0, 1) at exactly 0.25, (1, 0)
    assert (at_quarter["micro_precision"], at_quarter["micro_recall"]) == pytest.approx((3 / 4, 1.0))


def test_label_prior_metrics_by_hand():
    """Train frequencies [0.75, 0.25, 0]: only class 0 clears 0.5, so it is predicted for every eval image;
    every class's scores tie, so each AP is that class's eval positive rate (1/4)."""
    train = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    evaluated = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    got = label_prior_metrics(train, evaluated)
    want = {
        "map": 0.25,
        "micro_precision": 1 / 4, "micro_recall": 1 / 3, "micro_f1": 2 / 7,
        "macro_precision": 1 / 12, "macro_recall": 1 / 3, "macro_f1": 2 / 15,
        "cp": 1 / 12, "cr": 1 / 3, "cf1": 2 / 15,
        "op": 1 / 4, "or": 1 / 3, "of1": 2 / 7,
    }
    assert got.keys() == multilabel_metrics(evaluated, evaluated).keys()
    assert got == pytest.approx(want)


def test_label_prior_below_the_threshold_predicts_nothing():
    train = torch.tensor([[1, 0], [0, 1], [0, 0]], dtype=torch.float32)  # frequencies 1/3, 1/3
    evaluated = torch.tensor([[1, 1], [1, 0]], dtype=torch.float32)
    got = label_prior_metrics(train, evaluated)
    assert got["micro_f1"] == got["macro_f1"] == got["cf1"] == 0.0
    assert got["map"] == pytest.approx((1.0 + 0.5) / 2)  # positive rates 2/2 and 1/2
