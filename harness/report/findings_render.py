"""The findings of `harness.report.findings` as the page's context, a Markdown section and CSV columns.

Markdown and CSV carry the same evidence columns (`EVIDENCE_COLUMNS`, by their CSV names), so a reader of
either gets the same numbers; the HTML shows them formatted, with each column's meaning in its tooltip.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from harness.report import plots
from harness.report.data import OPTIMISTIC, AblationData, group_stats, headline
from harness.report.evidence import ALPHA, MAX_SEEDS, POWER
from harness.report.findings import (
    EVIDENCE_COLUMNS,
    NOT_BETTER_THAN_CHANCE,
    evidence_table,
    ood_table,
    robustness_auc,
    robustness_curves,
    size_table,
    summary,
)
from harness.report.perclass import per_class_deltas
from harness.tracking import names as tracking_names

EVIDENCE_KEYS = [c for c, _ in EVIDENCE_COLUMNS]


def _ok(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, digits: int = 3, sign: bool = False) -> str:
    """A number for a table cell ("—" when missing); minus signs typeset."""
    if not _ok(value):
        return "—"
    text = f"{float(value):+.{digits}f}" if sign else f"{float(value):.{digits}f}"
    return text.replace("-", "−")


def fmt_p(value: Any) -> str:
    if not _ok(value):
        return "—"
    return "<0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def fmt_seeds(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f">{MAX_SEEDS}" if math.isinf(float(value)) else str(int(value))


def _ci(low: Any, high: Any, sign: bool = True) -> str:
    return f"[{fmt(low, sign=sign)}, {fmt(high, sign=sign)}]" if _ok(low) else ""


def method_note(data: AblationData) -> list[str]:
    """How the evidence was computed, in plain words."""
    head = headline(data)
    notes = [
        f"Headline metric: {head.label} (`{head.key}`). The val mAP at the best epoch is shown only as “{OPTIMISTIC}”.",
        "Δ: variant − baseline at the same grid point. Pairing: “paired t” when both share ≥2 seeds (Δ is the mean "
        "of per-seed differences; the seed fixes data order and initialisation), else “Welch t” (unpaired); no "
        "interval with fewer than 2 seeds per side — intervals need ≥2 seeds per variant.",
        f"Holm: step-down correction across all {{m}} variant-vs-baseline comparisons of this ablation; the corrected "
        f"interval is the t interval at 1 − {ALPHA}/k (k: the comparison's Holm divisor). A variant is called better "
        f"or worse only when its Holm p < {ALPHA} and its corrected interval excludes 0.",
        f"MDE: the smallest |Δ| the test finds with {POWER:.0%} power at α = {ALPHA} (two-sided) for these seeds and "
        "the observed sd (paired: sd of per-seed differences; Welch: pooled sd, two-sample t power), exact via the "
        f"noncentral t. Seeds needed: seeds per variant for {POWER:.0%} power to detect the observed |Δ| (for "
        f"effect), same sd; “>{MAX_SEEDS}” when out of reach. Power from an observed effect is a rough guide: "
        "the observed effect is itself uncertain.",
        "Chance: the label-prior baseline (each class scored by its training frequency) on the headline set. "
        f"“{NOT_BETTER_THAN_CHANCE}”: the 95% interval of the per-run (metric − chance) reaches 0.",
    ]
    return notes


def _evidence_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for _, r in table.iterrows():
        rows.append({
            "group": r["group"], "variant": r["variant"], "grid_point": r["grid_point"],
            "is_baseline": r["is_baseline"],
            "n": int(r["n"]), "mean": fmt(r["mean"]), "ci": _ci(r["ci_low"], r["ci_high"], sign=False),
            "chance_map": fmt(r["chance_map"]), "chance_f1": fmt(r["chance_f1"]),
            "delta": "baseline" if r["is_baseline"] else fmt(r["delta"], sign=True),
            "delta_ci": _ci(r["delta_ci_low"], r["delta_ci_high"]), "method": r["method"] if _ok(r["delta"]) else "",
            "p": fmt_p(r["p"]), "p_holm": fmt_p(r["p_holm"]), "holm_ci": _ci(r["holm_ci_low"], r["holm_ci_high"]),
            "mde": fmt(r["mde"]), "seeds_needed": fmt_seeds(r["seeds_needed"]), "effect": fmt(r["effect"]),
            "verdict": r["verdict"] if isinstance(r["verdict"], str) else "", "flag": r["chance_flag"],
            "cls": {"better": "up", "worse": "down"}.get(str(r["verdict"]), ""),
        })
    return rows


def _table_rows(frame: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Formatted rows of a size / OOD / robustness / per-class table (every numeric column as text)."""
    rows = []
    for _, r in frame.iterrows():
        row = {k: r[k] for k in ("group", "variant", "grid_point", "is_baseline", "n", *extra) if k in r}
        for key in ("mean", "in_mean", "ood_mean", "auc", "ap", "baseline_ap"):
            if key in r:
                row[key] = fmt(r[key])
        for key, lo, hi in (("ci", "ci_low", "ci_high"), ("gap_ci", "gap_ci_low", "gap_ci_high")):
            if lo in r:
                row[key] = _ci(r[lo], r[hi], sign=key != "ci")
        for key in ("delta", "gap"):
            if key in r:
                row[key] = fmt(r[key], sign=True)
        row["delta_ci"] = _ci(r.get("delta_ci_low", r.get("low")), r.get("delta_ci_high", r.get("high")))
        if "low" in r:
            row["delta"] = fmt(r["delta"], sign=True)
        row["support"] = fmt(r["support"], 0) if "support" in r else ""
        row["method"] = r.get("method", "") or ""
        rows.append(row)
    return rows


def _model_frame(data: AblationData, table: pd.DataFrame) -> pd.DataFrame:
    stats = group_stats(data).set_index("group")
    out = table[["group", "variant", "grid_point", "point_rank", "mean", "ci_low", "ci_high"]].copy()
    for name, key in (("flops", tracking_names.FLOPS_PER_IMAGE), ("params", tracking_names.PARAMS)):
        col = f"{key}_mean"
        out[name] = [float(stats.loc[g, col]) if col in stats and g in stats.index else math.nan for g in out["group"]]
    return out


def findings_view(data: AblationData, colours: dict[str, str]) -> dict[str, Any]:
    """The evidence part of the page: outcome sentences, the evidence table, secondary tables and figures."""
    if data.finished.empty:
        return {"summary": [], "rows": [], "notes": []}
    head = headline(data)
    table = evidence_table(data)
    m = int(table["p_holm"].notna().sum()) if "p_holm" in table else 0
    curves = robustness_curves(data)
    per_class = per_class_deltas(data.per_class, data.finished, data.baseline)
    return {
        "headline": head.label,
        "headline_short": head.short,
        "summary": summary(table, data),
        "rows": _evidence_rows(table),
        "notes": [n.replace("{m}", str(m)) for n in method_note(data)],
        "columns": dict(EVIDENCE_COLUMNS),
        "per_class": _table_rows(per_class, ("direction", "class")),
        "per_class_split": str(data.per_class["split"].iloc[0]) if not data.per_class.empty else "",
        "sizes": _table_rows(size_table(data), ("size", "metric")),
        "ood": _table_rows(ood_table(data), ("in_metric",)),
        "robust": _table_rows(robustness_auc(data, curves), ("family",)),
        "model_svg": plots.accuracy_vs_model(_model_frame(data, table), colours, data.baseline, head.short),
        "robust_svg": plots.robustness_bands(curves, colours, data.baseline),
    }


# ------------------------------------------------------------------------------------------ text outputs


def evidence_frame(data: AblationData) -> pd.DataFrame:
    """The evidence columns per group (group plus EVIDENCE_COLUMNS), as the CSV and Markdown carry them."""
    if data.finished.empty:
        return pd.DataFrame(columns=["group", *EVIDENCE_KEYS])
    return evidence_table(data)[["group", *EVIDENCE_KEYS]]


def _md(text: Any) -> str:
    return re.sub(r"([\\`*_{}\[\]<>|#])", r"\\\1", str(text)).replace("\n", " ")


def _md_cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return _md(value)


def evidence_markdown(data: AblationData) -> str:
    """The outcome sentences, the evidence table (EVIDENCE_COLUMNS by CSV name) and how it was computed."""
    frame = evidence_frame(data)
    if frame.empty:
        return ""
    table = evidence_table(data)
    lines = [f"### Evidence: {_md(headline(data).label)}\n"]
    for point in summary(table, data):
        where = f"{_md(point['grid_point'])}: " if point["grid_point"] else ""
        lines.append(f"- **{where}{_md(point['outcome'])}.**")
        lines += [f"  - {_md(s['text'])}" for s in point["sentences"]]
    if data.baseline is None:
        lines.append("- No baseline declared, so there is no comparison.")
    head = ["group", *EVIDENCE_KEYS]
    lines += ["", "| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_md_cell(row[c]) for c in head) + " |")
    m = int(table["p_holm"].notna().sum())
    lines += [""] + [f"- {_md(n.replace('{m}', str(m)))}" for n in method_note(data)]
    return "\n".join(lines) + "\n"
