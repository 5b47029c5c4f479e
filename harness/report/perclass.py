"""Per-class average precision from each run's eval/per_class_ap.json, and gains/losses vs the baseline.

A variant's mAP gain may come from a few classes; the report lists the classes whose AP moves most in
each direction, with a per-class interval across seeds. These intervals are not corrected for the ~80
classes looked at: about one in twenty excludes 0 by chance, so they point where to look, not a verdict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from harness.report.stats import delta_vs_baseline
from harness.tracking import names as tracking_names
from harness.tracking import query

PER_CLASS_COLUMNS = ["run_id", "split", "epoch", "class", "ap", "support"]
GAIN, LOSS = "gain", "loss"


def parse_per_class(text: bytes | str) -> pd.DataFrame | None:
    """One artifact's rows (split, epoch, class, ap, support); None when it is not the documented JSON."""
    try:
        doc = json.loads(text)
        classes, ap = list(doc["classes"]), list(doc["ap"])
        support = list(doc.get("support") or [math.nan] * len(classes))
    except (ValueError, KeyError, TypeError):
        return None
    if len(ap) != len(classes) or len(support) != len(classes):
        return None
    return pd.DataFrame({
        "split": doc.get("split", ""), "epoch": doc.get("epoch"), "class": [str(c) for c in classes],
        "ap": pd.to_numeric(pd.Series(ap, dtype=object), errors="coerce").astype(float),
        "support": pd.to_numeric(pd.Series(support, dtype=object), errors="coerce").astype(float),
    })


def load_per_class(store: query.Store, run_ids: Sequence[str], artifact_uris: Mapping[str, str]) -> pd.DataFrame:
    """The per-class AP artifact of every run that has one, with a run_id column."""
    ids = list(dict.fromkeys(run_ids))
    if not ids:
        return pd.DataFrame(columns=PER_CLASS_COLUMNS)

    def one(rid: str) -> pd.DataFrame | None:
        raw = query.read_artifact_bytes(store, rid, tracking_names.PER_CLASS_AP_ARTIFACT, artifact_uris.get(rid))
        frame = parse_per_class(raw) if raw is not None else None
        return frame.assign(run_id=rid) if frame is not None and len(frame) else None

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ids)))) as pool:
        parts = [p for p in pool.map(one, ids) if p is not None]
    if not parts:
        return pd.DataFrame(columns=PER_CLASS_COLUMNS)
    return pd.concat(parts, ignore_index=True)[PER_CLASS_COLUMNS]


def _by_seed(frame: pd.DataFrame, seeds: Mapping[str, Any]) -> dict[str, dict[Any, float]]:
    """{class: {seed: ap}} for the runs in `frame` (seed from `seeds`, a run_id → seed map)."""
    out: dict[str, dict[Any, float]] = {}
    for rid, cls, ap in zip(frame["run_id"], frame["class"], frame["ap"], strict=True):
        if math.isfinite(ap):
            out.setdefault(cls, {})[seeds.get(rid, rid)] = float(ap)
    return out


def per_class_deltas(per_class: pd.DataFrame, runs: pd.DataFrame, baseline: str | None, top: int = 5
                     ) -> pd.DataFrame:
    """Per non-baseline group: the `top` classes gaining and the `top` losing most AP vs the baseline.

    `runs`: finished runs (run_id, variant, group, grid_point, point_rank, seed). Columns: group, variant,
    grid_point, point_rank, direction (gain / loss), class, delta, low, high, method, n, ap, baseline_ap,
    support (mean test/val positives of the class). Classes without a finite AP on both sides are skipped.
    """
    columns = ["group", "variant", "grid_point", "point_rank", "direction", "class", "delta", "low", "high",
               "method", "n", "ap", "baseline_ap", "support"]
    if per_class.empty or baseline is None or runs.empty:
        return pd.DataFrame(columns=columns)
    merged = per_class.merge(runs[["run_id", "variant", "group", "grid_point", "point_rank"]], on="run_id")
    seeds = dict(zip(runs["run_id"], runs["seed"], strict=True))
    rows = []
    for group, part in merged.groupby("group", sort=False):
        first = part.iloc[0]
        if first["variant"] == baseline:
            continue
        base = merged[(merged["variant"] == baseline) & (merged["point_rank"] == first["point_rank"])]
        if base.empty:
            continue
        mine, theirs = _by_seed(part, seeds), _by_seed(base, seeds)
        support = part.groupby("class")["support"].mean()
        found = []
        for cls in sorted(set(mine) & set(theirs)):
            e = delta_vs_baseline(mine[cls], theirs[cls])
            if math.isfinite(e.estimate):
                found.append((cls, e))
        found.sort(key=lambda item: item[1].estimate)
        gains = [f for f in reversed(found) if f[1].estimate > 0][:top]
        losses = [f for f in found if f[1].estimate < 0][:top]
        for direction, chosen in ((GAIN, gains), (LOSS, losses)):
            for cls, e in chosen:
                rows.append({
                    "group": group, "variant": first["variant"], "grid_point": first["grid_point"],
                    "point_rank": first["point_rank"], "direction": direction, "class": cls,
                    "delta": e.estimate, "low": e.low, "high": e.high, "method": e.method, "n": e.n,
                    "ap": sum(mine[cls].values()) / len(mine[cls]),
                    "baseline_ap": sum(theirs[cls].values()) / len(theirs[cls]),
                    "support": float(support.get(cls, math.nan)),
                })
    return pd.DataFrame(rows, columns=columns)
