"""Multi-label classification metrics as the field reports them.

micro/macro precision, recall and F1 at a threshold; mAP (mean over classes of non-interpolated
average precision, classes without a positive left out); and ML-GCN's CP/CR/CF1 (per-class averages,
F1 of the averages) and OP/OR/OF1 (pooled over all labels).
"""

from __future__ import annotations

import torch
from torch import Tensor


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class AP [C]; NaN for classes with no positive. scores/targets are [N, C]."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).double()
    cum_hits = hits.cumsum(0)
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64).unsqueeze(1)
    positives = hits.sum(0)
    ap = (cum_hits / ranks * hits).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def _f1(p: Tensor, r: Tensor) -> Tensor:
    return _safe_div(2 * p * r, p + r)


def multilabel_metrics(scores: Tensor, targets: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """All metrics for probabilities `scores` [N, C] against 0/1 `targets` [N, C]."""
    scores, targets = scores.detach().double().cpu(), targets.detach().double().cpu()
    pred = (scores >= threshold).double()
    tp = (pred * targets).sum(0)
    n_pred = pred.sum(0)
    n_true = targets.sum(0)
    present = n_true > 0

    micro_p = _safe_div(tp.sum(), n_pred.sum())
    micro_r = _safe_div(tp.sum(), n_true.sum())

    class_p, class_r = _safe_div(tp, n_pred), _safe_div(tp, n_true)
    class_f1 = _f1(class_p, class_r)
    counted = present | (n_pred > 0)  # classes that occur or were predicted
    macro_p = class_p[counted].mean() if counted.any() else torch.tensor(0.0)
    macro_r = class_r[present].mean() if present.any() else torch.tensor(0.0)
    macro_f1 = class_f1[counted].mean() if counted.any() else torch.tensor(0.0)

    # ML-GCN: CP averages tp/max(n_pred, 1) over classes; CR averages over classes that occur.
    cp = (tp / n_pred.clamp_min(1))[present].mean() if present.any() else torch.tensor(0.0)
    cr = class_r[present].mean() if present.any() else torch.tensor(0.0)

    ap = average_precision(scores, targets)
    m_ap = ap[~ap.isnan()].mean() if (~ap.isnan()).any() else torch.tensor(0.0)
    values = {
        "map": m_ap,
        "micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": _f1(micro_p, micro_r),
        "macro_precision": macro_p, "macro_recall": macro_r, "macro_f1": macro_f1,
        "cp": cp, "cr": cr, "cf1": _f1(cp, cr),
        "op": micro_p, "or": micro_r, "of1": _f1(micro_p, micro_r),
    }
    return {name: float(value) for name, value in values.items()}


# Direction of each metric: True when higher is better.
HIGHER_IS_BETTER = {
    "loss": False, "map": True, "micro_precision": True, "micro_recall": True, "micro_f1": True,
    "macro_precision": True, "macro_recall": True, "macro_f1": True,
    "cp": True, "cr": True, "cf1": True, "op": True, "or": True, "of1": True,
}
