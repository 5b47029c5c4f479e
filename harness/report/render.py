"""Turn `AblationData` into an offline HTML page (jinja2, autoescape on), Markdown or CSV.

The HTML is self-contained: inline CSS, plots as inline SVG, one small inline sorter script that carries
no data. Every user string goes through jinja2's autoescaping (or matplotlib's SVG text escaping).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from harness.analysis.section import analysis_section
from harness.errors import HarnessError
from harness.report import plots
from harness.report.data import (
    FAILED,
    OPTIMISTIC,
    RUNNING,
    TEST_SECTION,
    TRAIN_SIZE_AXIS,
    AblationData,
    Column,
    best_rows,
    curve_stats,
    delta_columns,
    environment,
    group_stats,
    headline,
    op_summary,
    run_period,
    table_columns,
)
from harness.report.findings import evidence_table, summary
from harness.report.findings_render import EVIDENCE_KEYS, evidence_frame, evidence_markdown, findings_view
from harness.report.stats import NO_CI, PAIRED, WELCH, mean_std
from harness.tracking import names as tracking_names
from harness.tracking.uri import ensure_writable_dir

METHOD_MARK = {PAIRED: "p", WELCH: "w", NO_CI: ""}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("harness.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# ------------------------------------------------------------------------------------------ formatting


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _sig(value: float, digits: int = 3) -> str:
    if value == 0:
        return "0"
    mag = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - mag)
    return f"{value:,.{decimals}f}"


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.3g}"


def fmt_value(value: Any, kind: str) -> str:
    """Format a mean for the table."""
    if not _finite(value):
        return "—"
    v = float(value)
    if kind in ("score", "loss"):
        return f"{v:.3f}"
    if kind == "seconds":
        return _sig(v, 3)
    if kind == "rate":
        return f"{v:,.0f}" if abs(v) >= 100 else _sig(v, 3)
    if kind == "mib":
        return f"{v:,.0f}"
    if kind in ("count", "flops"):
        return _si(v)
    if kind == "share":
        return f"{v:.0%}"
    return _sig(v, 3)


def fmt_std(value: Any, kind: str) -> str:
    """Format a standard deviation ("" where it says nothing: n < 2, or model size/FLOPs)."""
    if not _finite(value) or kind in ("count", "flops") or (kind == "share" and float(value) == 0):
        return ""
    if kind in ("seconds", "rate") and float(value) != 0:
        return "±" + _sig(float(value), 2)
    return "±" + fmt_value(value, kind)


def fmt_delta(value: Any) -> str:
    return f"{float(value):+.3f}".replace("-", "−") if _finite(value) else "—"


# ------------------------------------------------------------------------------------------ view model


@dataclass
class TableView:
    sections: list[tuple[str, int]]  # first header row: (title, colspan)
    headers: list[dict[str, Any]]  # second header row
    rows: list[dict[str, Any]]
    footnotes: list[str]


def _delta_cell(row: pd.Series, col: Column) -> dict[str, Any]:
    p = f"delta_{col.key}"
    est, lo, hi, method = row.get(p), row.get(f"{p}_low"), row.get(f"{p}_high"), row.get(f"{p}_method") or ""
    if row["is_baseline"] and _finite(est):
        return {"text": "baseline", "ci": "", "mark": "", "cls": "ref", "sort": 0.0, "title": "the reference row"}
    if not _finite(est):
        return {"text": "—", "ci": "", "mark": "", "cls": "", "sort": "", "title": "no finished baseline run here"}
    ci = f"[{fmt_delta(lo)}, {fmt_delta(hi)}]" if _finite(lo) else "(intervals need ≥2 seeds)"
    better = col.higher_is_better
    cls = ""
    if _finite(lo) and (lo > 0 or hi < 0):
        cls = "up" if (lo > 0) == better else "down"
    n, nb = int(row.get(f"{p}_n") or 0), int(row.get(f"{p}_nb") or 0)
    title = f"{method}, {n} seed pairs" if method == PAIRED else f"{method}, n={n} vs {nb}"
    return {"text": fmt_delta(est), "ci": ci, "mark": METHOD_MARK.get(method, ""), "cls": cls, "sort": float(est),
            "title": title}


def _layout(data: AblationData, columns: Sequence[Column]) -> list[tuple[str, Column]]:
    """Column order of the table: val mAP, Δ vs baseline, cost, then the other accuracy metrics."""
    first = [c for c in columns if c.section in ("val mAP", TEST_SECTION)]
    cost = [c for c in columns if c.section == "cost"]
    rest = [c for c in columns if c not in first and c not in cost]
    deltas = list(delta_columns(data)) if data.baseline is not None else []
    return [("col", c) for c in first] + [("delta", c) for c in deltas] + [("col", c) for c in cost + rest]


def comparison_view(data: AblationData, table: pd.DataFrame, columns: Sequence[Column],
                    colours: dict[str, str], html: bool = True) -> TableView:
    """Cells, header rows and footnotes of the HTML comparison table."""
    layout = _layout(data, columns)
    sections: list[tuple[str, int]] = [("", 2)]
    headers: list[dict[str, Any]] = [
        {"label": "group", "title": "variant × grid point", "numeric": False},
        {"label": "runs", "title": "finished runs (seeds) in the averages", "numeric": True},
    ]
    for what, col in layout:
        section = "Δ vs baseline (95% CI)" if what == "delta" else col.section
        if sections[-1][0] == section:
            sections[-1] = (section, sections[-1][1] + 1)
        else:
            sections.append((section, 1))
        if what == "delta":
            headers.append({"label": f"Δ {headline(data).short}", "title": f"difference of {col.key} vs the baseline",
                            "numeric": True, "delta": True})
        else:
            arrow = "↑" if col.higher_is_better else "↓"
            headers.append({"label": f"{col.label} {arrow}", "title": col.key, "numeric": True, "delta": False})
    best = {col.key: best_rows(table, col, per_point=True) for col in columns}
    rows = []
    for i, row in table.iterrows():
        cells = []
        for what, col in layout:
            if what == "delta":
                cells.append({"delta": True, **_delta_cell(row, col)})
                continue
            mean = row.get(f"{col.key}_mean")
            cells.append(
                {
                    "delta": False,
                    "text": fmt_value(mean, col.kind),
                    "std": fmt_std(row.get(f"{col.key}_std"), col.kind),
                    "sort": float(mean) if _finite(mean) else "",
                    "best": i in best[col.key],
                }
            )
        rows.append(
            {
                "order": i,
                "variant": row["variant"],
                "grid_point": row["grid_point"],
                "colour": colours.get(row["variant"], "#777777"),
                "is_baseline": bool(row["is_baseline"]),
                "n": int(row["n_finished"]),
                "n_failed": int(row["n_failed"]),
                "n_running": int(row["n_running"]),
                "seeds": ", ".join(str(s) for s in row["seeds"]),
                "cells": cells,
                "point_start": i == 0 or table.loc[i - 1, "point_rank"] != row["point_rank"],
            }
        )
    where = " at the same grid point" if data.grid_axes else ""
    notes = [
        "Cells: mean ± sample std (n−1) over the finished runs (seeds) of the group; failed and still-running "
        "runs are left out." + (f" ↑/↓: higher/lower is better. Green: best in the column{where}." if html else ""),
        f"“{OPTIMISTIC}”: the val mAP of the epoch chosen by val mAP itself, so biased upwards; final = last "
        "epoch; test = the held-out test set at that chosen epoch. F1, precision and recall are micro-averaged "
        "at threshold 0.5. s/epoch and img/s: training pass. FLOPs: forward, per image. DCN share: share of "
        "profiled self time in deformable sampling (on the CPU in fp32 the whole deformable layer: its kernel "
        "samples and multiplies in one pass).",
    ]
    if data.baseline is not None:
        marks = "Superscript p" if html else "paired t"
        notes.append(
            f"Δ {headline(data).short}: variant − baseline “{data.baseline}” ({data.baseline_source}){where}, "
            f"with a 95% confidence interval across seeds. {marks}: paired t over the seeds both groups finished "
            f"(Δ is the mean of the per-seed differences); {'w' if html else 'Welch t'}: Welch's t (unpaired, "
            "used when fewer than 2 seeds are shared); no interval when a side has fewer than 2 runs."
            + (" Green/red: the interval excludes 0 (better/worse)." if html else "")
        )
    else:
        notes.append(
            f"No baseline declared (experiment tag {tracking_names.BASELINE_VARIANT} or --baseline), so no Δ columns."
        )
    return TableView(sections, headers, rows, notes)


def _period_text(data: AblationData) -> str:
    first, last = run_period(data)
    if first is None:
        return "—"
    fmt = "%Y-%m-%d %H:%M"
    return f"{first.strftime(fmt)} → {last.strftime(fmt)} UTC" if last is not None else first.strftime(fmt)


def _column(frame: pd.DataFrame, key: str) -> list[Any]:
    """`frame[key]` as a list, Nones where the column is missing (metric names hold "/": no attributes)."""
    return list(frame[key]) if key in frame else [None] * len(frame)


def _time_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return ""
    return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M")


def ablation_view(data: AblationData, index_href: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Everything the ablation template needs."""
    now = now or datetime.now(UTC)
    runs = data.runs
    variants = sorted(set(runs["variant"])) if not runs.empty else []
    if data.baseline in variants:
        variants.remove(data.baseline)
        variants.insert(0, data.baseline)
    colours = plots.colours_for(variants, data.baseline)
    columns = table_columns(data) if not runs.empty else []
    table = group_stats(data, columns) if not runs.empty else pd.DataFrame()
    finished = data.count("finished") if not runs.empty else 0
    figures: dict[str, str | None] = {"curves": None, "scatter": None, "scaling": None, "ops": None}
    if finished:
        figures["curves"] = plots.learning_curves(curve_stats(data), table, colours, data.baseline)
        head = headline(data)
        figures["scatter"] = plots.accuracy_vs_cost(table, colours, data.baseline, head.key, head.short)
        if TRAIN_SIZE_AXIS in data.grid_axes:
            figures["scaling"] = plots.scaling_curves(table, colours, data.baseline, TRAIN_SIZE_AXIS, head.key,
                                                      head.short)
        summaries = op_summary(data)
        shares = {}
        fin = data.finished
        if tracking_names.PROFILE_DEFORM_SHARE in fin:
            for v, part in fin.groupby("variant"):
                m, s, _ = mean_std(list(part[tracking_names.PROFILE_DEFORM_SHARE]))
                shares[str(v)] = (m, s)
        ordered = {v: summaries[v] for v in variants if v in summaries}
        figures["ops"] = plots.op_bars(ordered, shares, colours)
    figures["studies"] = plots.study_plots(data.trials, data.studies, colours) if not data.trials.empty else None
    analysis = ""
    if finished and data.store is not None:
        analysis = analysis_section(data.runs, data.store, baseline=data.baseline, ablation=data.name)
    failed = runs[runs["state"] == FAILED] if not runs.empty else runs
    running = runs[runs["state"] == RUNNING] if not runs.empty else runs
    return {
        "name": data.name,
        "description": data.description,
        "index_href": index_href,
        "generated": now.strftime("%Y-%m-%d %H:%M UTC"),
        "period": _period_text(data),
        "tracking_uri": data.tracking_uri,
        "baseline": data.baseline,
        "baseline_source": data.baseline_source,
        "counts": {"finished": finished, "failed": len(failed), "running": len(running)},
        "environment": environment(data) if not runs.empty else [],
        "table": comparison_view(data, table, columns, colours) if not table.empty else None,
        "evidence": findings_view(data, colours) if finished else {"summary": [], "rows": [], "notes": []},
        "figures": figures,
        "has_train_size": TRAIN_SIZE_AXIS in data.grid_axes,
        "studies": _study_rows(data),
        "analysis": analysis,
        "legend": [(v, colours[v]) for v in variants],
        "failed": [
            {
                "run_name": r.run_name,
                "group": r.group,
                "seed": r.seed,
                "status": r.status,
                "reason": r.failure,
                "ended": _time_text(r.end_time),
                "run_id": r.run_id,
            }
            for r in failed.itertuples(index=False)
        ],
        "running": [
            {
                "run_name": r.run_name,
                "group": r.group,
                "seed": r.seed,
                "started": _time_text(r.start_time),
                "val_map": fmt_value(latest, "score"),
                "run_id": r.run_id,
            }
            for r, latest in zip(running.itertuples(index=False), _column(running, tracking_names.VAL_MAP), strict=True)
        ],
    }


def _study_rows(data: AblationData) -> list[dict[str, Any]]:
    """One row per Optuna study: trial counts by state and the best learning rate."""
    rows = []
    for study in data.studies.itertuples(index=False):
        part = data.trials[data.trials["study"] == study.study] if not data.trials.empty else data.trials
        count = part["state"].value_counts() if not part.empty else {}
        rows.append({
            "study": study.study, "variant": study.variant, "metric": study.metric, "direction": study.direction,
            "complete": int(count.get("COMPLETE", 0)), "pruned": int(count.get("PRUNED", 0)),
            "failed": int(count.get("FAIL", 0)), "best_lr": _sig(study.best_lr) if _finite(study.best_lr) else "—",
            "best_value": fmt_value(study.best_value, "score"), "best_trial": study.best_trial,
        })
    return rows


# ------------------------------------------------------------------------------------------ output


def render_ablation_html(data: AblationData, index_href: str | None = None, now: datetime | None = None) -> str:
    """The report page of one ablation."""
    return _env.get_template("ablation.html.j2").render(page=ablation_view(data, index_href, now))


def render_index_html(datas: Sequence[AblationData], hrefs: Sequence[str], now: datetime | None = None) -> str:
    """The index page linking several ablation reports."""
    now = now or datetime.now(UTC)
    entries = []
    for data, href in zip(datas, hrefs, strict=True):
        runs = data.runs
        states = runs["state"].value_counts() if not runs.empty else pd.Series(dtype=int)
        outcome = ""
        if not runs.empty and data.baseline is not None and (runs["state"] == "finished").any():
            points = summary(evidence_table(data), data)
            if points:
                p = points[-1]  # the largest grid point
                where = f"{p['grid_point']}: " if p["grid_point"] else ""
                outcome = f"{headline(data).short}, {where}{p['outcome']}"
        entries.append(
            {
                "headline": outcome,
                "name": data.name,
                "description": data.description,
                "href": href,
                "baseline": data.baseline or "—",
                "variants": len(set(runs["variant"])) if not runs.empty else 0,
                "finished": int(states.get("finished", 0)),
                "failed": int(states.get("failed", 0)),
                "running": int(states.get("running", 0)),
                "period": _period_text(data),
            }
        )
    tracking = datas[0].tracking_uri if datas else ""
    return _env.get_template("index.html.j2").render(
        page={"entries": entries, "generated": now.strftime("%Y-%m-%d %H:%M UTC"), "tracking_uri": tracking}
    )


def report_filename(name: str, taken: set[str] | None = None) -> str:
    """A file name for the report of ablation `name` (unique within `taken`, which it updates)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "ablation"
    if base.lower() == "index":
        base = "index_ablation"
    candidate, i = f"{base}.html", 2
    taken = taken if taken is not None else set()
    while candidate in taken:
        candidate, i = f"{base}-{i}.html", i + 1
    taken.add(candidate)
    return candidate


def _ensure_folder(folder: Path, what: str) -> None:
    """Create `folder` (with its parents); a one-line error when a file stands in the way or it is not writable."""
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if ancestor == folder and not ancestor.is_dir():
                raise HarnessError(f"{what}: {folder} is a file, not a directory")
            if not ancestor.is_dir():
                raise HarnessError(f"{what}: cannot create {folder}: {ancestor} is a file")
            break
    ensure_writable_dir(folder, what)


def write_text_atomic(path: Path, text: str, what: str = "report") -> None:
    """Write `text` to `path` whole or not at all: into a temporary file in the same folder, then `os.replace`.

    Creates the folder when needed. A one-line `HarnessError` naming `what`, the path and the reason when the
    folder cannot be created or the file cannot be written; no temporary file is left behind.
    """
    _ensure_folder(path.parent, f"{what} {path}")
    if path.is_dir():
        raise HarnessError(f"{what} {path}: is a directory, not a file")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 so the report gets the usual umask-derived mode (mkstemp would make it 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise HarnessError(f"{what} {path}: cannot write: {exc.strerror or exc}") from None
        raise


def write_html_reports(datas: Sequence[AblationData], out_dir: Path, now: datetime | None = None) -> list[Path]:
    """Write one page per ablation into `out_dir` (plus index.html when there are several); return the paths.

    Every page is rendered before the first is written, and each is written atomically (`write_text_atomic`):
    a failure leaves no partial page. A one-line `HarnessError` when `out_dir` is a file or cannot be written.
    """
    _ensure_folder(out_dir, "HTML reports")
    taken: set[str] = set()
    names = [report_filename(d.name, taken) for d in datas]
    several = len(datas) > 1
    pages = [
        (out_dir / name, render_ablation_html(data, "index.html" if several else None, now))
        for data, name in zip(datas, names, strict=True)
    ]
    if several:  # the index last: it links pages that exist by then
        pages.append((out_dir / "index.html", render_index_html(datas, names, now)))
    for path, html in pages:
        write_text_atomic(path, html, "HTML report")
    paths = [path for path, _ in pages]
    return paths[-1:] + paths[:-1] if several else paths


def comparison_frame(data: AblationData) -> pd.DataFrame:
    """The comparison table as plain numbers (one row per group), as written by `--format csv`."""
    if data.runs.empty:
        return pd.DataFrame()
    columns = table_columns(data)
    table = group_stats(data, columns)
    out = pd.DataFrame(
        {
            "ablation": data.name,
            "group": table["group"],
            "variant": table["variant"],
            "grid_point": table["grid_point"],
            "baseline": table["is_baseline"],
            "n_finished": table["n_finished"],
            "n_failed": table["n_failed"],
            "n_running": table["n_running"],
            "seeds": [" ".join(str(s) for s in seeds) for seeds in table["seeds"]],
        }
    )
    for col in columns:
        out[f"{col.key}_mean"] = table[f"{col.key}_mean"]
        out[f"{col.key}_std"] = table[f"{col.key}_std"]
    if data.baseline is not None:
        for col in delta_columns(data):
            p = f"delta_{col.key}"
            out[p] = table[p]
            out[f"{p}_ci_low"] = table[f"{p}_low"]
            out[f"{p}_ci_high"] = table[f"{p}_high"]
            out[f"{p}_method"] = table[f"{p}_method"]
    evidence = evidence_frame(data).set_index("group")
    for key in EVIDENCE_KEYS:  # the evidence columns, as in the Markdown evidence table
        out[key] = [evidence[key].get(g) if g in evidence.index else None for g in out["group"]]
    return out


def comparison_csv(datas: Sequence[AblationData]) -> str:
    """CSV of the comparison tables of `datas` (column `ablation` tells them apart)."""
    frames = [comparison_frame(d) for d in datas]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return "ablation,group\n"
    buf = io.StringIO()
    pd.concat(frames, ignore_index=True).to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue()


def _md_escape(text: Any) -> str:
    return re.sub(r"([\\`*_{}\[\]<>|#])", r"\\\1", str(text)).replace("\n", " ")


def comparison_markdown(datas: Sequence[AblationData]) -> str:
    """Markdown: per ablation a heading, the comparison table (mean ± std, Δ [95% CI]) and footnotes."""
    parts = []
    for data in datas:
        n = {s: data.count(s) if not data.runs.empty else 0 for s in ("finished", "failed", "running")}
        parts.append(f"## {_md_escape(data.name)}\n")
        if data.description:
            parts.append(f"{_md_escape(data.description)}\n")
        parts.append(f"{n['finished']} finished, {n['failed']} failed, {n['running']} running runs.\n")
        if data.runs.empty:
            continue
        evidence = evidence_markdown(data)
        if evidence:
            parts.append(evidence)
        columns = table_columns(data)
        table = group_stats(data, columns)
        layout = _layout(data, columns)
        head = ["group", "n"] + [
            f"Δ {c.section} {c.label} [95% CI]" if what == "delta" else f"{c.section} {c.label}" for what, c in layout
        ]
        lines = ["| " + " | ".join(_md_escape(h) for h in head) + " |", "|" + "---|" * len(head)]
        for _, row in table.iterrows():
            cells = [_md_escape(row["group"]) + (" (baseline)" if row["is_baseline"] else ""), str(row["n_finished"])]
            for what, col in layout:
                if what == "delta":
                    cell = _delta_cell(row, col)
                    mark = f" ({row[f'delta_{col.key}_method']})" if cell["mark"] else ""
                    cells.append(f"{cell['text']} {cell['ci']}{mark}".strip())
                else:
                    std = fmt_std(row[f"{col.key}_std"], col.kind)
                    cells.append(fmt_value(row[f"{col.key}_mean"], col.kind) + (f" {std}" if std else ""))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
        view = comparison_view(data, table, columns, {}, html=False)
        parts.append("\n".join(f"- {_md_escape(note)}" for note in view.footnotes) + "\n")
    return "\n".join(parts)
