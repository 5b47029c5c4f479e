"""What the runs support, as tables: the headline comparison with Holm and power, chance, sizes, OOD, robustness.

Everything here is computed from `AblationData` (finished runs only) with `harness.report.evidence`;
`findings_render` turns it into HTML, Markdown and CSV. The headline metric is `data.headline`: the
held-out test mAP when logged, else the last epoch's val mAP; a best-on-val value is never the headline.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from harness.report.data import MAP, AblationData, Headline, headline, values_by_seed
from harness.report.evidence import (
    BETTER,
    INCONCLUSIVE,
    MAX_SEEDS,
    TOO_FEW,
    WORSE,
    Evidence,
    above_chance,
    compare_family,
    curve_area,
    t_interval,
    verdict,
)
from harness.report.stats import delta_vs_baseline
from harness.tracking import names as tracking_names

BASELINE_ROW = "baseline"
NOT_BETTER_THAN_CHANCE = "not better than chance"
# (column, header): the same columns in the CSV and the Markdown evidence table
EVIDENCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("metric", "metric"),
    ("n", "seeds"),
    ("n_baseline", "baseline seeds"),
    ("mean", "mean"),
    ("ci_low", "95% CI low"),
    ("ci_high", "95% CI high"),
    ("delta", "Δ vs baseline"),
    ("delta_ci_low", "Δ 95% CI low"),
    ("delta_ci_high", "Δ 95% CI high"),
    ("method", "pairing"),
    ("p", "p"),
    ("p_holm", "Holm p"),
    ("holm_ci_low", "Δ Holm CI low"),
    ("holm_ci_high", "Δ Holm CI high"),
    ("mde", "MDE (80% power)"),
    ("seeds_needed", "seeds needed"),
    ("effect", "for effect"),
    ("chance_map", "chance mAP"),
    ("chance_f1", "chance F1"),
    ("chance_flag", "chance flag"),
    ("verdict", "verdict"),
)
_ROBUST_MAP = re.compile(rf"^{re.escape(tracking_names.ROBUST_PREFIX)}([a-z]+)/(-?[0-9.eE+-]+)/{MAP}$")


def _ordered_groups(data: AblationData) -> list[tuple[str, pd.DataFrame]]:
    """(group, finished runs) by grid point, the baseline first, then by variant."""
    fin = data.finished
    if fin.empty:
        return []
    parts = list(fin.groupby("group", sort=False))
    parts.sort(key=lambda gp: (int(gp[1]["point_rank"].iloc[0]), gp[1]["variant"].iloc[0] != data.baseline,
                               str(gp[1]["variant"].iloc[0])))
    return parts


def _baseline_runs(data: AblationData, point_rank: int) -> pd.DataFrame:
    fin = data.finished
    return fin[(fin["variant"] == data.baseline) & (fin["point_rank"] == point_rank)]


def _mean_of(frame: pd.DataFrame, key: str) -> float:
    vals = list(values_by_seed(frame, key).values())
    return float(np.mean(vals)) if vals else math.nan


def evidence_table(data: AblationData) -> pd.DataFrame:
    """One row per group: the headline mean with CI, Δ vs baseline, p, Holm, MDE, seeds needed, chance.

    Columns: group, variant, grid_point, point_rank, is_baseline, then EVIDENCE_COLUMNS. Holm runs across
    every variant-vs-baseline comparison of the ablation (all grid points).
    """
    head = headline(data)
    rows, pairs, compared = [], [], []
    for group, runs in _ordered_groups(data):
        first = runs.iloc[0]
        values = values_by_seed(runs, head.key)
        mean, lo, hi = t_interval(list(values.values()))
        chance = values_by_seed(runs, head.chance_key)
        _, _, below = above_chance(values, chance)
        is_base = first["variant"] == data.baseline
        row: dict[str, Any] = {
            "group": group, "variant": first["variant"], "grid_point": first["grid_point"],
            "point_rank": int(first["point_rank"]), "is_baseline": bool(is_base), "metric": head.key,
            "n": len(values), "mean": mean, "ci_low": lo, "ci_high": hi,
            "chance_map": _mean_of(runs, head.chance_key), "chance_f1": _mean_of(runs, head.chance_f1_key),
            "chance_flag": NOT_BETTER_THAN_CHANCE if chance and below else "",
            "verdict": BASELINE_ROW if is_base else "",
        }
        base = _baseline_runs(data, row["point_rank"]) if data.baseline is not None else pd.DataFrame()
        if not is_base and not base.empty:
            pairs.append((values, values_by_seed(base, head.key)))
            compared.append(len(rows))
        rows.append(row)
    for i, e in zip(compared, compare_family(pairs), strict=True):
        rows[i].update(_evidence_cells(e, head))
    columns = ["group", "variant", "grid_point", "point_rank", "is_baseline", *(c for c, _ in EVIDENCE_COLUMNS)]
    return pd.DataFrame(rows).reindex(columns=columns)


def _evidence_cells(e: Evidence, head: Headline) -> dict[str, Any]:
    return {
        "delta": e.estimate, "delta_ci_low": e.low, "delta_ci_high": e.high, "method": e.method, "p": e.p,
        "p_holm": e.p_holm, "holm_ci_low": e.holm_low, "holm_ci_high": e.holm_high, "mde": e.mde,
        "seeds_needed": e.seeds_needed, "effect": e.effect, "n_baseline": e.n_baseline,
        "verdict": verdict(e, head.column.higher_is_better),
    }


def _num(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{v:+.{digits}f}".replace("-", "−") if math.isfinite(v) else "—"


def _p(value: Any) -> str:
    v = float(value)
    return "—" if not math.isfinite(v) else ("< 0.001" if v < 0.001 else f"{v:.3f}")


def statement(row: pd.Series, data: AblationData) -> str:
    """One plain sentence on a comparison: better, worse, inconclusive (and what it would take), too few seeds."""
    head = headline(data)
    where = f" at {row['grid_point']}" if row["grid_point"] else ""
    who = f"{row['variant']}{where}"
    chance = f"; it is {NOT_BETTER_THAN_CHANCE} (chance mAP {float(row['chance_map']):.3f})" \
        if row["chance_flag"] else ""
    kind = row["verdict"]
    if kind == TOO_FEW:
        return (f"{who}: Δ {head.short} {_num(row['delta'])} from {int(row['n'])} seed(s) against "
                f"{int(row.get('n_baseline', 0) or 0)}; intervals need ≥2 seeds per variant, so no conclusion{chance}.")
    ci = f"95% CI [{_num(row['delta_ci_low'])}, {_num(row['delta_ci_high'])}]"
    holm = (f"Holm-corrected [{_num(row['holm_ci_low'])}, {_num(row['holm_ci_high'])}], Holm p {_p(row['p_holm'])}, "
            f"{row['method']}, n={int(row['n'])}")
    if kind in (BETTER, WORSE):
        word = "better" if kind == BETTER else "worse"
        return f"{who} is {word} than the baseline: Δ {head.short} {_num(row['delta'])} ({ci}; {holm}){chance}."
    need = float(row["seeds_needed"])
    effect, mde = abs(float(row["effect"])), float(row["mde"])
    if math.isfinite(need):
        what = f"would need about {int(need)} seeds to detect an effect of {effect:.3f}"
    elif effect > 0:
        what = f"would need more than {MAX_SEEDS} seeds to detect an effect of {effect:.3f}"
    else:
        what = "no difference observed"
    floor = f"; with {int(row['n'])} seeds the smallest effect detectable at 80% power is {mde:.3f}" \
        if math.isfinite(mde) else ""
    return f"{who}: {INCONCLUSIVE}: {what} (Δ {head.short} {_num(row['delta'])}, {ci}; {holm}){floor}{chance}."


def summary(table: pd.DataFrame, data: AblationData) -> list[dict[str, Any]]:
    """Per grid point: the outcome in one line, then a sentence per variant (best estimate first)."""
    if table.empty or data.baseline is None:
        return []
    out = []
    for _, part in table.groupby("point_rank", sort=True):
        rows = part[~part["is_baseline"] & part["verdict"].astype(str).ne("")]
        if rows.empty:
            continue
        rows = rows.sort_values("delta", ascending=False, na_position="last")
        better = [r["variant"] for _, r in rows.iterrows() if r["verdict"] == BETTER]
        point = part["grid_point"].iloc[0]
        if better:
            outcome = f"better than the baseline after Holm correction: {', '.join(better)}"
        elif (rows["verdict"] == TOO_FEW).all():
            outcome = "no conclusion: intervals need ≥2 seeds per variant"
        else:
            outcome = "no variant is shown better than the baseline at this seed count"
        sentences = [{"text": statement(r, data), "cls": r["verdict"].replace(" ", "-")} for _, r in rows.iterrows()]
        out.append({"grid_point": point, "outcome": outcome, "sentences": sentences})
    return out


# ------------------------------------------------------------------------------------ secondary tables


def _size_keys(data: AblationData, head: Headline) -> dict[str, str]:
    """{size: metric key} of the per-size mAP that the runs logged for the headline's split."""
    fin = data.finished
    stems = [head.key, tracking_names.val_of(MAP), tracking_names.final_of(tracking_names.val_of(MAP))]
    for stem in stems:
        keys = {s: tracking_names.by_size(stem, s) for s in tracking_names.OBJECT_SIZES}
        if any(k in fin and pd.to_numeric(fin[k], errors="coerce").notna().any() for k in keys.values()):
            return keys
    return {}


def _paired_rows(data: AblationData, keys: dict[str, str], label: str) -> pd.DataFrame:
    """Per group and `label` value: mean with CI and Δ vs the baseline (same grid point) of keys[label]."""
    rows = []
    for group, runs in _ordered_groups(data):
        first = runs.iloc[0]
        base = _baseline_runs(data, int(first["point_rank"])) if data.baseline is not None else pd.DataFrame()
        for what, key in keys.items():
            values = values_by_seed(runs, key)
            if not values:
                continue
            mean, lo, hi = t_interval(list(values.values()))
            d = delta_vs_baseline(values, values_by_seed(base, key)) if not base.empty else None
            rows.append({
                "group": group, "variant": first["variant"], "grid_point": first["grid_point"],
                "is_baseline": first["variant"] == data.baseline, label: what, "metric": key, "n": len(values),
                "mean": mean, "ci_low": lo, "ci_high": hi,
                "delta": d.estimate if d else math.nan, "delta_ci_low": d.low if d else math.nan,
                "delta_ci_high": d.high if d else math.nan, "method": d.method if d else "",
            })
    return pd.DataFrame(rows)


def size_table(data: AblationData) -> pd.DataFrame:
    """mAP by dominant-object size per group (mean, CI, Δ vs baseline); empty when not logged."""
    keys = _size_keys(data, headline(data))
    return _paired_rows(data, keys, "size") if keys else pd.DataFrame()


def ood_table(data: AblationData) -> pd.DataFrame:
    """Per group: headline (in-distribution) and ood mAP, the per-run gap ood − in with CI, Δ ood vs baseline."""
    key = tracking_names.ood_of(MAP)
    fin = data.finished
    if key not in fin or not pd.to_numeric(fin[key], errors="coerce").notna().any():
        return pd.DataFrame()
    head = headline(data)
    rows = []
    for group, runs in _ordered_groups(data):
        first = runs.iloc[0]
        ood, ind = values_by_seed(runs, key), values_by_seed(runs, head.key)
        if not ood:
            continue
        gap, gap_lo, gap_hi = t_interval([ood[s] - ind[s] for s in ood if s in ind])
        base = _baseline_runs(data, int(first["point_rank"])) if data.baseline is not None else pd.DataFrame()
        d = delta_vs_baseline(ood, values_by_seed(base, key)) if not base.empty else None
        rows.append({
            "group": group, "variant": first["variant"], "grid_point": first["grid_point"],
            "is_baseline": first["variant"] == data.baseline, "n": len(ood),
            "in_metric": head.key, "in_mean": float(np.mean(list(ind.values()))) if ind else math.nan,
            "ood_mean": float(np.mean(list(ood.values()))), "gap": gap, "gap_ci_low": gap_lo, "gap_ci_high": gap_hi,
            "delta": d.estimate if d else math.nan, "delta_ci_low": d.low if d else math.nan,
            "delta_ci_high": d.high if d else math.nan, "method": d.method if d else "",
        })
    return pd.DataFrame(rows)


def robustness_curves(data: AblationData) -> pd.DataFrame:
    """run_id, group, variant, point_rank, seed, family, magnitude, value: the robust/<family>/<m>/map metrics."""
    fin = data.finished
    found = [(c, m.group(1), float(m.group(2))) for c in fin.columns if isinstance(c, str)
             for m in [_ROBUST_MAP.match(c)] if m]
    rows = []
    for col, family, magnitude in found:
        for r, value in zip(fin.itertuples(index=False), fin[col], strict=True):
            if value is not None and not pd.isna(value):
                rows.append({"run_id": r.run_id, "group": r.group, "variant": r.variant, "grid_point": r.grid_point,
                             "point_rank": r.point_rank, "seed": r.seed, "family": family, "magnitude": magnitude,
                             "value": float(value)})
    columns = ["run_id", "group", "variant", "grid_point", "point_rank", "seed", "family", "magnitude", "value"]
    return pd.DataFrame(rows, columns=columns)


def robustness_auc(data: AblationData, curves: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per group and family: mean normalised area under the mAP-vs-magnitude curve, Δ vs baseline with CI."""
    curves = robustness_curves(data) if curves is None else curves
    if curves.empty:
        return pd.DataFrame()
    per_run = curves.groupby(["run_id", "group", "variant", "grid_point", "point_rank", "seed", "family"],
                             sort=False, dropna=False).apply(
        lambda p: curve_area(p["magnitude"], p["value"]), include_groups=False).rename("auc").reset_index()
    per_run["seed"] = per_run["seed"].where(per_run["seed"].notna(), per_run["run_id"])
    rows = []
    for (group, family), part in per_run.groupby(["group", "family"], sort=False):
        first = part.iloc[0]
        mine = dict(zip(part["seed"], part["auc"], strict=True))
        base = per_run[(per_run["variant"] == data.baseline) & (per_run["point_rank"] == first["point_rank"])
                       & (per_run["family"] == family)]
        d = delta_vs_baseline(mine, dict(zip(base["seed"], base["auc"], strict=True))) \
            if not base.empty and first["variant"] != data.baseline else None
        mean, lo, hi = t_interval(list(mine.values()))
        rows.append({"group": group, "variant": first["variant"], "grid_point": first["grid_point"],
                     "point_rank": first["point_rank"], "family": family,
                     "is_baseline": first["variant"] == data.baseline, "n": len(mine), "auc": mean,
                     "ci_low": lo, "ci_high": hi, "delta": d.estimate if d else math.nan,
                     "delta_ci_low": d.low if d else math.nan, "delta_ci_high": d.high if d else math.nan,
                     "method": d.method if d else ""})
    return pd.DataFrame(rows).sort_values(["point_rank", "family", "is_baseline", "variant"],
                                          ascending=[True, True, False, True]).reset_index(drop=True)
