"""Multi-label metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from harness.metrics import average_precision, multilabel_metrics


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
    assert (m["op"], m["or"]) == (m["micro_precision"], m["micro_recall"])


def test_perfect_and_empty_predictions():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    perfect = multilabel_metrics(targets.clone(), targets)
    assert perfect["map"] == perfect["micro_f1"] == perfect["macro_f1"] == 1.0
    nothing = multilabel_metrics(torch.zeros(2, 2), targets)
    assert nothing["micro_precision"] == 0.0 and nothing["micro_f1"] == 0.0 and nothing["cp"] == 0.0
