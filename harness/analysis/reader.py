"""Read back what `harness eval` logged: metrics robust/*, offset/*, erf/* and the analysis/ artifacts.

Everything comes from the MLflow store through `harness.tracking.query.Store` (its client), nothing
from results/ by path. Metric names are parsed as docs/analysis.md defines them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.tracking import names, query

_ROBUST = re.compile(
    rf"^{re.escape(names.ROBUST_PREFIX)}(?P<family>[a-z]+)/(?P<magnitude>-?[0-9.eE+-]+)/(?P<metric>[a-z_0-9]+)$"
)
_OFFSET = re.compile(rf"^{re.escape(names.OFFSET_PREFIX)}conv(?P<layer>\d+)(?:/(?P<region>[a-z]+))?/(?P<stat>[a-z_]+)$")
_ERF = re.compile(rf"^{re.escape(names.ERF_PREFIX)}(?P<stat>[a-z_0-9]+)$")


@dataclass
class AnalysedRun:
    """One child run with its analysis metrics, as stored in MLflow."""

    run_id: str
    name: str
    status: str
    variant: str
    group: str
    seed: str
    baseline: bool
    artifact_uri: str
    start_time: int = 0
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def analysed(self) -> bool:
        return names.ANALYSIS in self.tags

    @property
    def layout(self) -> str:
        deform = self.params.get("model.deform_layers", "none")
        if deform in ("none", "[]", ""):
            return "standard conv"
        layout = {"per_tap": "per-tap 2·k·k", "shared": "shared 2"}.get(self.params.get("model.offset_channels", ""),
                                                                         self.params.get("model.offset_channels", "?"))
        return f"deform {deform}, {layout}"


def open_reader(store: query.Store | str | None) -> query.Store:
    return store if isinstance(store, query.Store) else query.open_store(store)


def load_runs(store: query.Store, run_ids: Iterable[str]) -> list[AnalysedRun]:
    """The runs `run_ids` (in that order), unknown ids left out."""
    ids = list(dict.fromkeys(str(r) for r in run_ids))

    def one(run_id: str) -> AnalysedRun | None:
        try:
            run = store.client.get_run(run_id)
        except Exception:
            return None
        tags = dict(run.data.tags)
        variant = tags.get(names.VARIANT) or (run.info.run_name or run_id).split("/", 1)[0]
        return AnalysedRun(
            run_id=run_id, name=run.info.run_name or run_id, status=run.info.status, variant=variant,
            group=tags.get(names.GROUP) or variant, seed=tags.get(names.SEED, ""),
            baseline=tags.get(names.BASELINE, "").lower() == "true", artifact_uri=run.info.artifact_uri,
            start_time=int(run.info.start_time or 0),
            params=dict(run.data.params), metrics=dict(run.data.metrics), tags=tags,
        )

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ids)))) as pool:
        found = list(pool.map(one, ids)) if ids else []
    return [r for r in found if r is not None]


def robustness_frame(runs: Iterable[AnalysedRun]) -> pd.DataFrame:
    """run_id, group, variant, seed, family, magnitude, metric, value (one row per robust/… metric)."""
    rows = []
    for run in runs:
        for key, value in run.metrics.items():
            m = _ROBUST.match(key)
            if m is None:
                continue
            try:
                magnitude = float(m["magnitude"])
            except ValueError:
                continue
            rows.append({"run_id": run.run_id, "group": run.group, "variant": run.variant, "seed": run.seed,
                         "family": m["family"], "magnitude": magnitude, "metric": m["metric"], "value": value})
    columns = ["run_id", "group", "variant", "seed", "family", "magnitude", "metric", "value"]
    return pd.DataFrame(rows, columns=columns)


def offset_frame(runs: Iterable[AnalysedRun]) -> pd.DataFrame:
    """run_id, group, layer, region ("all" for the whole plane), stat, value."""
    rows = []
    for run in runs:
        for key, value in run.metrics.items():
            m = _OFFSET.match(key)
            if m is None:
                continue
            rows.append({"run_id": run.run_id, "group": run.group, "layer": int(m["layer"]),
                         "region": m["region"] or "all", "stat": m["stat"], "value": value})
    return pd.DataFrame(rows, columns=["run_id", "group", "layer", "region", "stat", "value"])


def erf_frame(runs: Iterable[AnalysedRun]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for key, value in run.metrics.items():
            m = _ERF.match(key)
            if m is not None:
                rows.append({"run_id": run.run_id, "group": run.group, "stat": m["stat"], "value": value})
    return pd.DataFrame(rows, columns=["run_id", "group", "stat", "value"])


def artifact_bytes(store: query.Store, run: AnalysedRun, path: str) -> bytes | None:
    """The bytes of artifact `path` of `run` (read in place when local, else downloaded), or None."""
    return query.read_artifact_bytes(store, run.run_id, path, run.artifact_uri)


def artifact_csv(store: query.Store, run: AnalysedRun, path: str) -> pd.DataFrame | None:
    return query.read_artifact_csv(store, run.run_id, path, run.artifact_uri)


def artifact_npy(store: query.Store, run: AnalysedRun, path: str) -> np.ndarray | None:
    data = artifact_bytes(store, run, path)
    if data is None:
        return None
    import io

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError):
        return None
    return array if array.ndim == 2 and np.isfinite(array).all() else None


def finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))
