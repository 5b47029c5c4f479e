"""From the MLflow store to report-ready DataFrames: one row per run, per-group statistics, curves.

Reads through `harness.tracking.query` only, and only what docs/tracking.md promises.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.report.perclass import load_per_class
from harness.report.stats import delta_vs_baseline, mean_std
from harness.tracking import names as tracking_names
from harness.tracking import query

FINISHED, FAILED, RUNNING = "finished", "failed", "running"
_STATE = {"FINISHED": FINISHED, "FAILED": FAILED, "KILLED": FAILED, "RUNNING": RUNNING, "SCHEDULED": RUNNING}

OP_TABLE_ARTIFACT = tracking_names.OP_TABLE_ARTIFACT
CURVE_KEYS = (tracking_names.TRAIN_LOSS, tracking_names.VAL_LOSS, tracking_names.VAL_MICRO_F1,
              tracking_names.VAL_MAP)
ENV_TAGS = {
    tracking_names.GIT_COMMIT: "git commit",
    tracking_names.DEVICE: "device",
    tracking_names.DCN_KERNEL: "DCN kernel",
    tracking_names.HOST: "host",
    tracking_names.VERSION: "harness",
    tracking_names.TORCH: "torch",
    tracking_names.CUDA: "CUDA",
    tracking_names.PYTHON: "Python",
    tracking_names.PACKAGES: "packages",
}
TRAIN_SIZE_AXIS = "data.train_size"
# operator names that look like deformable sampling (the runner adds a row for its sampling scope)
_DEFORM_OP = re.compile(r"deform|grid_sampl|bilinear|im2col", re.IGNORECASE)


@dataclass(frozen=True)
class Column:
    """A numeric column of the comparison table."""

    key: str  # the per-run metric in MLflow
    label: str  # column header (second header row)
    section: str  # first header row
    higher_is_better: bool
    kind: str = "score"  # score | loss | seconds | rate | mib | count | flops | share
    highlight: bool = True  # mark the best value of the column


OPTIMISTIC = "best on val (optimistic: chosen on the same data)"
ACCURACY_COLUMNS: tuple[Column, ...] = (
    Column(tracking_names.best_of(tracking_names.VAL_MAP), OPTIMISTIC, "val mAP", True),
    Column(tracking_names.final_of(tracking_names.VAL_MAP), "final", "val mAP", True),
) + tuple(
    Column(tracking_names.final_of(metric), "final", section, metric != tracking_names.VAL_LOSS,
           "loss" if metric == tracking_names.VAL_LOSS else "score")
    for metric, section in (
        (tracking_names.VAL_MICRO_F1, "val F1 (micro)"),
        (tracking_names.VAL_MICRO_PRECISION, "val precision (micro)"),
        (tracking_names.VAL_MICRO_RECALL, "val recall (micro)"),
        (tracking_names.VAL_LOSS, "val loss"),
    )
)
# held-out, out-of-distribution and label-prior metrics (shown when any finished run has them)
MAP, MICRO_F1 = "map", "micro_f1"  # harness.metrics names
TEST_SECTION = "test (held-out, selected epoch)"
EXTRA_COLUMNS: tuple[Column, ...] = (
    Column(tracking_names.test_of(MAP), "mAP", TEST_SECTION, True),
    Column(tracking_names.test_of(MICRO_F1), "F1 (micro)", TEST_SECTION, True),
    Column(tracking_names.ood_of(MAP), "mAP", "out-of-distribution", True),
    Column(tracking_names.chance_of(MAP), "mAP", "chance (label prior)", True, highlight=False),
    Column(tracking_names.chance_of(MICRO_F1), "F1 (micro)", "chance (label prior)", True, highlight=False),
)
COST_COLUMNS: tuple[Column, ...] = (
    Column(tracking_names.MEAN_EPOCH_TIME, "s/epoch", "cost", False, "seconds"),
    Column(tracking_names.MEAN_TRAIN_IMAGES_PER_S, "train img/s", "cost", True, "rate"),
    Column(tracking_names.PEAK_CUDA_MB, "peak GPU MiB", "cost", False, "mib"),
    Column(tracking_names.PEAK_RSS_MB, "peak RSS MiB", "cost", False, "mib"),
    Column(tracking_names.PARAMS, "params", "cost", False, "count"),
    Column(tracking_names.FLOPS_PER_IMAGE, "FLOPs/img", "cost", False, "flops"),
    Column(tracking_names.PROFILE_DEFORM_SHARE, "DCN share", "cost", False, "share", highlight=False),
)


@dataclass(frozen=True)
class Headline:
    """The metric the report judges variants by: held-out test when logged, else the last epoch's val."""

    column: Column
    f1_key: str
    split: str  # "test" or "val"
    chance_key: str
    chance_f1_key: str

    @property
    def key(self) -> str:
        return self.column.key

    @property
    def label(self) -> str:
        if self.split == "test":
            return "test mAP (held-out, at the selected epoch)"
        return "final val mAP (last epoch; no held-out test set logged)"

    @property
    def short(self) -> str:
        return "test mAP" if self.split == "test" else "final val mAP"


@dataclass
class AblationData:
    """Everything the report shows for one ablation (one MLflow experiment)."""

    name: str
    experiment_id: str
    description: str
    baseline: str | None
    baseline_source: str
    runs: pd.DataFrame  # one row per child run, see `normalize_runs`
    histories: pd.DataFrame  # run_id, key, step, value (finished runs, CURVE_KEYS)
    op_tables: pd.DataFrame  # profile/op_table.csv rows of finished runs, with run_id
    tracking_uri: str = ""
    grid_axes: list[str] = field(default_factory=list)
    store: query.Store | None = None  # where the runs came from (the analysis section reads its artifacts)
    studies: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `study_tables`
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `perclass.load_per_class`

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["state"] == FINISHED]

    def count(self, state: str) -> int:
        return int((self.runs["state"] == state).sum())


# ------------------------------------------------------------------------------------------ loading


def _grid_sort_key(value: Any) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _parse_grid(tag: Any, run_name: str) -> dict[str, Any]:
    if isinstance(tag, str) and tag:
        try:
            grid = json.loads(tag)
            if isinstance(grid, dict):
                return grid
        except json.JSONDecodeError:
            pass
    grid = {}
    for part in (run_name or "").split("/")[1:]:  # <variant>/<axis=value>/...
        if "=" in part:
            key, value = part.split("=", 1)
            grid[key] = value
    return grid


def _seed(tag: Any, grid: dict[str, Any]) -> Any:
    value = tag if isinstance(tag, str) and tag else grid.get("seed")
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _tag(name: str) -> str:
    """The column of tag `name` in `query.search_runs` output."""
    return f"tags.{name}"


def normalize_runs(raw: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Turn `query.search_runs` output into the report's run table and the list of non-seed grid axes.

    Columns: run_id, run_name, status, state (finished/failed/running), variant, group, grid_point
    (label of the non-seed grid values, "" without a grid), grid (dict), seed, failure, start_time,
    end_time, is_baseline_tag, `grid.<axis>` for each non-seed axis, then one column per metric key.
    """

    def tag(row: pd.Series, key: str) -> Any:
        value = row.get(_tag(key))
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    records = []
    axes: list[str] = []
    for _, row in raw.iterrows():
        name = row.get("run_name") or ""
        grid = _parse_grid(tag(row, tracking_names.GRID), name)
        variant = tag(row, tracking_names.VARIANT) or name.split("/", 1)[0] or row["run_id"][:8]
        point = {k: v for k, v in grid.items() if k != "seed"}
        for k in point:
            if k not in axes:
                axes.append(k)
        point_label = " · ".join(f"{k}={v}" for k, v in point.items())
        group = tag(row, tracking_names.GROUP) or (f"{variant} · {point_label}" if point_label else variant)
        state = _STATE.get(str(row["status"]), RUNNING)
        failure = tag(row, tracking_names.FAILURE)
        if state == FAILED and not failure:
            stale = tag(row, tracking_names.STALE)
            if row["status"] == "KILLED":
                failure = f"killed: {stale}" if stale else "killed"
            else:
                failure = f"no reason recorded (tag {tracking_names.FAILURE} missing)"
        record = {
            "run_id": row["run_id"],
            "run_name": name,
            "status": row["status"],
            "state": state,
            "variant": str(variant),
            "group": str(group),
            "grid_point": point_label,
            "grid": grid,
            "point": point,
            "seed": _seed(tag(row, tracking_names.SEED), grid),
            "failure": failure,
            "start_time": row.get("start_time"),
            "end_time": row.get("end_time"),
            "is_baseline_tag": str(tag(row, tracking_names.BASELINE) or "").lower() == "true",
        }
        for key, value in row.items():
            if isinstance(key, str) and key.startswith("metrics."):
                record[key[len("metrics.") :]] = value
            elif isinstance(key, str) and key.startswith(_tag(tracking_names.PREFIX)):
                record[key[len("tags.") :]] = value
        records.append(record)
    runs = pd.DataFrame.from_records(records)
    if runs.empty:
        return runs, axes
    for axis in axes:
        runs[f"grid.{axis}"] = [p.get(axis) for p in runs["point"]]
    # a grid point is identified by its label (values from the JSON tag or the run name compare alike)
    sort_keys = {
        label: tuple(_grid_sort_key(p.get(a)) for a in axes)
        for label, p in zip(runs["grid_point"], runs["point"], strict=True)
    }
    rank = {label: i for i, label in enumerate(sorted(sort_keys, key=lambda lb: (sort_keys[lb], lb)))}
    runs["point_rank"] = [rank[label] for label in runs["grid_point"]]
    return runs, axes


def _resolve_baseline(exp_baseline: Any, override: str | None, runs: pd.DataFrame) -> tuple[str | None, str]:
    variants = sorted(set(runs["variant"])) if not runs.empty else []
    if override:
        if override not in variants:
            known = ", ".join(variants)
            raise HarnessError(f"--baseline {override!r} is not a variant of this ablation; variants: {known}")
        return override, "--baseline"
    if isinstance(exp_baseline, str) and exp_baseline:
        return exp_baseline, f"experiment tag {tracking_names.BASELINE_VARIANT}"
    tagged = sorted(set(runs.loc[runs["is_baseline_tag"], "variant"])) if not runs.empty else []
    if tagged:
        return tagged[0], f"run tag {tracking_names.BASELINE}"
    return None, "none declared"


def load_ablations(
    store: query.Store,
    names: Sequence[str] | None = None,
    baseline: str | None = None,
    with_artifacts: bool = True,
) -> list[AblationData]:
    """Load the named ablations (default: every experiment with harness runs) from `store`."""
    exps = query.harness_experiments(store)
    if names:
        known = list(exps["name"])
        every = list(query.experiments(store)["name"])
        missing = [n for n in names if n not in known]
        if missing:
            bad = missing[0]
            if bad in every:
                raise HarnessError(f"ablation {bad!r} has no harness runs in {store.uri}")
            hint = f"; known: {', '.join(known)}" if known else " (the store holds no harness runs)"
            raise HarnessError(f"unknown ablation {bad!r} in {store.uri}{hint}")
        exps = exps.set_index("name").loc[list(dict.fromkeys(names))].reset_index()
    elif exps.empty:
        child = f"{tracking_names.ROLE}={tracking_names.CHILD}"
        raise HarnessError(f"no harness runs in {store.uri} (nothing logged with tag {child})")
    out = []
    for exp in exps.itertuples(index=False):
        raw = query.search_runs(store, [exp.experiment_id])
        runs, axes = normalize_runs(raw)
        chosen, source = _resolve_baseline(exp.baseline, baseline, runs)
        finished_ids = list(runs.loc[runs["state"] == FINISHED, "run_id"]) if not runs.empty else []
        histories = query.metric_histories(store, finished_ids, CURVE_KEYS)
        uris = dict(zip(raw["run_id"], raw["artifact_uri"], strict=True)) if not raw.empty else {}
        ops = (
            query.artifact_tables(store, finished_ids, OP_TABLE_ARTIFACT, uris) if with_artifacts else pd.DataFrame()
        )
        studies, trials = study_tables(store, exp.experiment_id)
        per_class = load_per_class(store, finished_ids, uris) if with_artifacts else pd.DataFrame()
        out.append(
            AblationData(
                store=store,
                studies=studies,
                trials=trials,
                per_class=per_class,
                name=exp.name,
                experiment_id=exp.experiment_id,
                description=exp.description or "",
                baseline=chosen,
                baseline_source=source,
                runs=runs,
                histories=histories,
                op_tables=ops,
                tracking_uri=store.uri,
                grid_axes=axes,
            )
        )
    return out


def study_tables(store: query.Store, experiment_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Optuna studies logged by `harness tune` in this experiment, and their trials.

    studies: study, variant, metric, direction, best_lr, best_value, best_trial.
    trials: study, variant, number, state (COMPLETE/PRUNED/FAIL/RUNNING), lr, value (the objective: the
    best value of the metric over the epochs the trial ran, pruned trials included), epochs.
    """
    raw_studies = query.search_runs(store, [experiment_id], role=tracking_names.STUDY_ROLE)
    if raw_studies.empty:
        return pd.DataFrame(), pd.DataFrame()

    def get(row: pd.Series, key: str) -> Any:
        value = row.get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    studies = pd.DataFrame([
        {
            "study": get(r, _tag(tracking_names.STUDY)), "variant": get(r, _tag(tracking_names.VARIANT)),
            "metric": get(r, _tag(tracking_names.METRIC)) or tracking_names.VAL_MAP,
            "direction": get(r, _tag(tracking_names.DIRECTION)) or "maximize",
            "best_lr": _float(get(r, _tag(tracking_names.BEST_PARAM_PREFIX + "lr"))),
            "best_value": _float(get(r, _tag(tracking_names.BEST_VALUE))),
            "best_trial": get(r, _tag(tracking_names.BEST_TRIAL)),
        }
        for _, r in raw_studies.iterrows()
    ])
    raw_trials = query.search_runs(store, [experiment_id], role=tracking_names.TRIAL_ROLE)
    if raw_trials.empty:
        return studies, pd.DataFrame()
    # the study's metric is spelled as search.objective.metric (val_map); its runs log val/map
    metric_of = {s: tracking_names.logged_name(m) for s, m in zip(studies["study"], studies["metric"], strict=True)}
    maximize = dict(zip(studies["study"], studies["direction"] == "maximize", strict=True))
    keys = sorted(set(metric_of.values()))
    histories = query.metric_histories(store, list(raw_trials["run_id"]), keys)
    rows = []
    for _, r in raw_trials.iterrows():
        study = get(r, _tag(tracking_names.STUDY))
        metric = metric_of.get(study, tracking_names.VAL_MAP)
        values = histories[(histories["run_id"] == r["run_id"]) & (histories["key"] == metric)]["value"]
        finite = [v for v in values if math.isfinite(v)]
        value = (max(finite) if maximize.get(study, True) else min(finite)) if finite else math.nan
        state = get(r, _tag(tracking_names.TRIAL_STATE)) or ("RUNNING" if r["status"] == "RUNNING" else "FAIL")
        rows.append({
            "study": study, "variant": get(r, _tag(tracking_names.VARIANT)),
            "number": int(float(get(r, _tag(tracking_names.TRIAL_NUMBER)) or -1)),
            "state": state, "lr": _float(get(r, "params.lr")), "value": value, "epochs": len(values),
        })
    trials = pd.DataFrame(rows).sort_values(["study", "number"]).reset_index(drop=True)
    return studies, trials


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------- statistics


def table_columns(data: AblationData) -> list[Column]:
    """The comparison-table columns that have data: accuracy, then cost (one memory column)."""
    fin = data.finished
    cols = list(ACCURACY_COLUMNS) + [c for c in EXTRA_COLUMNS if _logged(fin, c.key)]
    for col in COST_COLUMNS:
        gpu_peak = tracking_names.PEAK_CUDA_MB
        if col.key == tracking_names.PEAK_RSS_MB and gpu_peak in fin and fin[gpu_peak].notna().any():
            continue  # GPU runs: the GPU peak is the memory figure that matters
        if col.key in (tracking_names.PEAK_CUDA_MB, tracking_names.PROFILE_DEFORM_SHARE) and (
            col.key not in fin or not fin[col.key].notna().any()
        ):
            continue
        cols.append(col)
    return cols


def _logged(frame: pd.DataFrame, key: str) -> bool:
    return key in frame and pd.to_numeric(frame[key], errors="coerce").notna().any()


def headline(data: AblationData) -> Headline:
    """test/map when any finished run logged it, else final/val/map; never a best-on-val value."""
    test = tracking_names.test_of(MAP)
    chance = tracking_names.chance_of(MAP), tracking_names.chance_of(MICRO_F1)
    if _logged(data.finished, test):
        return Headline(EXTRA_COLUMNS[0], tracking_names.test_of(MICRO_F1), "test", *chance)
    return Headline(ACCURACY_COLUMNS[1], tracking_names.final_of(tracking_names.VAL_MICRO_F1), "val", *chance)


def delta_columns(data: AblationData) -> tuple[Column, ...]:
    """The columns with a Δ vs baseline in the comparison table: the headline metric."""
    return (headline(data).column,)


def values_by_seed(frame: pd.DataFrame, key: str) -> dict[Any, float]:
    """{seed: value} of metric `key` over the runs of `frame` (the run id where a run has no seed)."""
    if key not in frame:
        return {}
    out = {}
    for seed, run_id, value in zip(frame["seed"], frame["run_id"], frame[key], strict=True):
        if value is not None and not pd.isna(value):
            out[run_id if seed is None or (isinstance(seed, float) and math.isnan(seed)) else seed] = float(value)
    return out


def group_stats(data: AblationData, columns: Sequence[Column] | None = None) -> pd.DataFrame:
    """One row per group (variant × grid point): counts, `<key>_mean/_std/_n`, and Δ vs baseline.

    Only finished runs enter the statistics; failed and running runs are counted. Δ columns (for
    `delta_columns`: the headline metric) are `delta_<key>`, `_low`, `_high`, `_method`, `_n`, `_nb`; NaN
    when the group's grid point has no finished baseline run or no baseline is declared. Rows are ordered
    by grid point, the baseline first, then by variant name.
    """
    columns = list(columns) if columns is not None else table_columns(data)
    runs = data.runs
    if runs.empty:
        return pd.DataFrame()
    rows = []
    fin = runs[runs["state"] == FINISHED]
    for group, members in runs.groupby("group", sort=False):
        first = members.iloc[0]
        done = members[members["state"] == FINISHED]
        row: dict[str, Any] = {
            "group": group,
            "variant": first["variant"],
            "grid_point": first["grid_point"],
            "point_rank": first["point_rank"],
            "is_baseline": first["variant"] == data.baseline,
            "n_finished": len(done),
            "n_failed": int((members["state"] == FAILED).sum()),
            "n_running": int((members["state"] == RUNNING).sum()),
            "seeds": sorted((s for s in done["seed"]), key=str),
        }
        for axis in data.grid_axes:
            row[f"grid.{axis}"] = first.get(f"grid.{axis}")
        for col in columns:
            mean, std, n = mean_std(list(done[col.key]) if col.key in done else [])
            row[f"{col.key}_mean"], row[f"{col.key}_std"], row[f"{col.key}_n"] = mean, std, n
        base = fin[(fin["variant"] == data.baseline) & (fin["point_rank"] == first["point_rank"])]
        for col in delta_columns(data):
            p = f"delta_{col.key}"
            if data.baseline is None or base.empty:
                row.update({p: math.nan, f"{p}_low": math.nan, f"{p}_high": math.nan, f"{p}_method": ""})
                row.update({f"{p}_n": 0, f"{p}_nb": 0})
                continue
            d = delta_vs_baseline(values_by_seed(done, col.key), values_by_seed(base, col.key))
            row.update({p: d.estimate, f"{p}_low": d.low, f"{p}_high": d.high, f"{p}_method": d.method})
            row.update({f"{p}_n": d.n, f"{p}_nb": d.n_baseline})
        rows.append(row)
    table = pd.DataFrame(rows)
    table["_order"] = [(0 if b else 1) for b in table["is_baseline"]]
    table = table.sort_values(["point_rank", "_order", "variant"], kind="stable").drop(columns="_order")
    return table.reset_index(drop=True)


def best_rows(table: pd.DataFrame, col: Column, per_point: bool = True) -> set[int]:
    """Row positions holding the best mean of `col` (per grid point when `per_point`)."""
    key = f"{col.key}_mean"
    if table.empty or key not in table or not col.highlight:
        return set()
    best: set[int] = set()
    groups = table.groupby("point_rank").groups.values() if per_point else [table.index]
    for idx in groups:
        vals = table.loc[idx, key].astype(float)
        vals = vals[np.isfinite(vals)]
        if len(vals) < 2 or vals.nunique() < 2:
            continue
        target = vals.max() if col.higher_is_better else vals.min()
        best.update(int(i) for i in vals.index[np.isclose(vals, target, rtol=1e-12, atol=0)])
    return best


def curve_stats(data: AblationData) -> pd.DataFrame:
    """Per group, metric and epoch: mean, std, min, max and n over the finished runs' histories."""
    hist = data.histories
    if hist.empty:
        return pd.DataFrame(columns=["group", "key", "step", "mean", "std", "min", "max", "n"])
    fin = data.finished[["run_id", "group"]]
    merged = hist.merge(fin, on="run_id", how="inner")
    merged = merged[merged["step"] >= 1]
    agg = merged.groupby(["group", "key", "step"])["value"].agg(["mean", "std", "min", "max", "count"])
    return agg.rename(columns={"count": "n"}).reset_index()


def op_summary(data: AblationData, top: int = 8) -> dict[str, pd.DataFrame]:
    """Per variant: the `top` operators by mean self time per profiled run (ms), with their share.

    Deformable-sampling operators always appear, even below the top `top` (so the DCN share shows).

    The time column is `self_cuda_ms` when any run has CUDA time, else `self_cpu_ms`. Columns: name,
    ms (mean over the variant's runs, 0 where an op is absent), share (of the summed self time), deform
    (name looks like deformable sampling).
    """
    ops = data.op_tables
    if ops.empty or "name" not in ops:
        return {}
    fin = data.finished[["run_id", "variant"]]
    ops = ops.merge(fin, on="run_id", how="inner")
    use_cuda = "self_cuda_ms" in ops and pd.to_numeric(ops["self_cuda_ms"], errors="coerce").fillna(0).gt(0).any()
    tcol = "self_cuda_ms" if use_cuda else "self_cpu_ms"
    if tcol not in ops:
        return {}
    ops = ops.assign(ms=pd.to_numeric(ops[tcol], errors="coerce").fillna(0.0))
    out = {}
    for variant, part in ops.groupby("variant", sort=True):
        n_runs = part["run_id"].nunique()
        per_op = part.groupby("name")["ms"].sum() / n_runs
        total = per_op.sum()
        ranked = per_op.sort_values(ascending=False)
        keep = list(ranked.index[:top]) + [n for n in ranked.index[top:] if _DEFORM_OP.search(str(n))]
        top_ops = ranked.loc[keep]
        frame = pd.DataFrame({"name": top_ops.index.astype(str), "ms": top_ops.values})
        frame["share"] = frame["ms"] / total if total > 0 else math.nan
        frame["deform"] = [bool(_DEFORM_OP.search(n)) for n in frame["name"]]
        frame.attrs["time_column"] = tcol
        frame.attrs["runs"] = n_runs
        out[str(variant)] = frame
    return out



def environment(data: AblationData) -> list[tuple[str, list[tuple[str, int]]]]:
    """(label, [(value, number of runs)]) for each environment tag, most common value first."""
    out = []
    for tag, label in ENV_TAGS.items():
        if tag not in data.runs:
            continue
        counts = data.runs[tag].dropna().astype(str).value_counts()
        if len(counts):
            out.append((label, [(str(v), int(c)) for v, c in counts.items()]))
    return out


def run_period(data: AblationData) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """Earliest start and latest end (or start, for runs still going) of the child runs."""
    if data.runs.empty:
        return None, None
    starts = pd.to_datetime(data.runs["start_time"], utc=True).dropna()
    ends = pd.to_datetime(data.runs["end_time"], utc=True).dropna()
    first = starts.min() if len(starts) else None
    last = max([t for t in (ends.max() if len(ends) else None, starts.max() if len(starts) else None) if t is not None],
               default=None)
    return first, last
