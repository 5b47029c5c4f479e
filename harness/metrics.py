"""Multi-label classification metrics as the field reports them.

micro/macro precision, recall and F1 at a threshold (a label is predicted when its score is `>=` the
threshold); mAP (mean over classes of non-interpolated average precision, classes without a positive
left out); and ML-GCN's CP/CR/CF1 (per-class averages, F1 of the averages) and OP/OR/OF1 (pooled over
all labels). `label_prior_metrics` is the chance baseline: the same metrics for scores that are the
training label frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class average precision [C] of `scores` against 0/1 `targets`, both [N, C]; NaN for a class
    with no positive.

    The definition is scikit-learn's `average_precision_score`: AP = Σ_k (R_k − R_{k−1}) P_k over the
    distinct score values k in descending order (step-wise, no interpolation), where P_k and R_k are the
    precision and recall of predicting every row scoring ≥ that value. Rows with equal scores therefore
    enter the precision–recall curve together: their order in the input does not matter, and a tie
    between a positive and a negative counts against the positive (all equal scores give AP = the
    positive rate, not 1). Vectorised over rows and classes: one sort per column, no Python loop.
    """
    n = scores.shape[0]
    hits = targets.double()
    if n == 0:
        return torch.full(scores.shape[1:], float("nan"), dtype=torch.float64, device=scores.device)
    sorted_scores, order = scores.sort(dim=0, descending=True)
    hits = hits.gather(0, order)
    cum_hits = hits.cumsum(0)
    # For each sorted position, the last position of its tie group (rows with the same score): a group
    # ends where the next score differs, or at the last row; a reversed running minimum over the ends'
    # indices carries each end back over its group.
    ends = torch.ones_like(sorted_scores, dtype=torch.bool)
    ends[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    rows = torch.arange(n, device=scores.device).unsqueeze(1).expand_as(ends)
    group_end = torch.where(ends, rows, torch.full_like(rows, n)).flip(0).cummin(0).values.flip(0)
    # precision at the end of each row's group; every positive in the group adds 1/P of recall at it
    precision = cum_hits.gather(0, group_end) / (group_end + 1).double()
    positives = cum_hits[-1]
    ap = (hits * precision).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """mAP: the mean of `average_precision` over the classes that have at least one positive in `targets`
    (a class without a positive has no defined AP and is left out, not counted as 0 as scikit-learn's
    `average="macro"` would); 0.0 when no class has a positive."""
    ap = average_precision(scores, targets)
    defined = ~ap.isnan()
    return ap[defined].mean() if defined.any() else torch.tensor(0.0, dtype=torch.float64)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def _f1(p: Tensor, r: Tensor) -> Tensor:
    return _safe_div(2 * p * r, p + r)


def multilabel_metrics(scores: Tensor, targets: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """All metrics for probabilities `scores` [N, C] against 0/1 `targets` [N, C].

    A label is predicted when `score >= threshold`. A ratio with a zero denominator is 0. Macro averages
    (scikit-learn's `precision_recall_fscore_support(average="macro", zero_division=0)` restricted to
    the classes named here): precision and F1 over the classes that occur in `targets` or were
    predicted; recall over the classes that occur. `map` is `mean_average_precision`. ML-GCN's CP
    averages tp / max(n_pred, 1) and CR averages recall, both over the classes that occur; CF1 is the
    F1 of CP and CR. OP/OR/OF1 are the micro (pooled) precision, recall and F1.
    """
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

    values = {
        "map": mean_average_precision(scores, targets),
        "micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": _f1(micro_p, micro_r),
        "macro_precision": macro_p, "macro_recall": macro_r, "macro_f1": macro_f1,
        "cp": cp, "cr": cr, "cf1": _f1(cp, cr),
        "op": micro_p, "or": micro_r, "of1": _f1(micro_p, micro_r),
    }
    return {name: float(value) for name, value in values.items()}


def label_prior_metrics(train_targets: Tensor, eval_targets: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """The chance baseline: `multilabel_metrics` of a model that ignores the image and scores every class
    by its frequency in `train_targets` [N_train, C], the same score for every image of `eval_targets`.

    It is what a network that learned only the label prior reaches, the floor a trained run is read
    against. The keys and the threshold semantics are multilabel_metrics' own: since every image gets
    the same scores, a class is predicted for all images when its training frequency is >= `threshold`
    and for none otherwise, so the F1 family is 0 unless some class is that common (COCO's person is).
    mAP is the mean over eval-positive classes of the class's eval prevalence (every row ties).
    """
    prior = train_targets.detach().double().cpu().mean(0) if train_targets.shape[0] else None
    if prior is None:
        prior = torch.zeros(eval_targets.shape[1], dtype=torch.float64)
    scores = prior.unsqueeze(0).expand(eval_targets.shape[0], -1)
    return multilabel_metrics(scores, eval_targets, threshold)


# Direction of each metric: True when higher is better.
HIGHER_IS_BETTER = {
    "loss": False, "map": True, "micro_precision": True, "micro_recall": True, "micro_f1": True,
    "macro_precision": True, "macro_recall": True, "macro_f1": True,
    "cp": True, "cr": True, "cf1": True, "op": True, "or": True, "of1": True,
}
