"""The read side of the MLflow store: runs, metric histories and artifacts as pandas DataFrames.

Everything here follows docs/tracking.md and nothing else; `harness.report` builds on these functions
and never imports mlflow itself. Reading never creates a store: a tracking URI that points at a missing
sqlite file, a missing directory or an unreachable server raises `HarnessError` before mlflow is asked.

`write_fixture_runs` at the end is the one writer here: it logs synthetic runs in the documented layout,
for the report benchmark (`harness bench report`) and demos. The runner has its own writer.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

from harness import settings
from harness.errors import HarnessError, one_line
from harness.tracking import names
from harness.tracking.uri import check_store, resolve_uri

ROLE_TAG = names.ROLE
_CHILD_FILTER = f"tags.`{names.ROLE}` = '{names.CHILD}'"
_STUDY_FILTER = f"tags.`{names.ROLE}` = '{names.STUDY_ROLE}'"
_PAGE = 1000
_BULK_CHUNK = 400
_RUN_COLUMNS = ["run_id", "experiment_id", "run_name", "status", "start_time", "end_time", "artifact_uri"]
_HISTORY_COLUMNS = ["run_id", "key", "step", "value", "timestamp"]


# ----------------------------------------------------------------------------------------------- store


@dataclass
class Store:
    """An opened tracking store: its URI and an `mlflow.MlflowClient`."""

    uri: str
    client: Any = field(repr=False)


def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def open_store(uri: str | None = None) -> Store:
    """Open the store at `uri` (see `harness.tracking.uri.resolve_uri`) for reading, or raise `HarnessError`."""
    uri = resolve_uri(uri)
    check_store(uri, create=False)
    _quiet_mlflow_logs()
    settings.apply_mlflow_defaults()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except (MlflowException, OSError) as exc:
        raise HarnessError(f"cannot read MLflow store {uri}: {one_line(exc, with_type=False)}") from None
    return Store(uri=uri, client=client)


# ----------------------------------------------------------------------------------------- experiments


def experiments(store: Store) -> pd.DataFrame:
    """Active experiments: experiment_id, name, description, baseline, artifact_location, tags (dict)."""
    rows = []
    token = None
    while True:
        page = store.client.search_experiments(max_results=_PAGE, page_token=token)
        for exp in page:
            tags = dict(exp.tags or {})
            rows.append(
                {
                    "experiment_id": exp.experiment_id,
                    "name": exp.name,
                    "description": tags.get(names.DESCRIPTION, tags.get("mlflow.note.content", "")),
                    "baseline": tags.get(names.BASELINE_VARIANT),
                    "artifact_location": exp.artifact_location,
                    "tags": tags,
                }
            )
        token = page.token
        if not token:
            break
    columns = ["experiment_id", "name", "description", "baseline", "artifact_location", "tags"]
    return pd.DataFrame(rows, columns=columns).sort_values("name", kind="stable").reset_index(drop=True)


def harness_experiments(store: Store) -> pd.DataFrame:
    """The experiments that hold at least one harness child run or Optuna study run (`harness.role`)."""
    exps = experiments(store)
    keep = [
        any(
            len(store.client.search_runs([eid], filter_string=role_filter, max_results=1)) > 0
            for role_filter in (_CHILD_FILTER, _STUDY_FILTER)
        )
        for eid in exps["experiment_id"]
    ]
    return exps[keep].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ runs


def _ms_to_time(ms: int | None) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def search_runs(store: Store, experiment_ids: Sequence[str], role: str | None = "child") -> pd.DataFrame:
    """Runs of `experiment_ids` as one row each, like `mlflow.search_runs(output_format="pandas")`.

    Columns: run_id, experiment_id, run_name, status, start_time, end_time (UTC timestamps),
    artifact_uri, then `metrics.<key>` (latest value; an older store's flat names under their current
    names, `names.with_logged_names`), `params.<key>`, `tags.<key>`.
    `role` filters on the `harness.role` tag (None: every run).
    """
    if not experiment_ids:
        return pd.DataFrame(columns=_RUN_COLUMNS)
    filter_string = f"tags.`{ROLE_TAG}` = '{role}'" if role else ""
    rows = []
    token = None
    while True:
        page = store.client.search_runs(
            list(experiment_ids), filter_string=filter_string, max_results=_PAGE, page_token=token
        )
        for run in page:
            info, data = run.info, run.data
            row: dict[str, Any] = {
                "run_id": info.run_id,
                "experiment_id": info.experiment_id,
                "run_name": info.run_name,
                "status": info.status,
                "start_time": _ms_to_time(info.start_time),
                "end_time": _ms_to_time(info.end_time),
                "artifact_uri": info.artifact_uri,
            }
            row.update({f"metrics.{k}": v for k, v in names.with_logged_names(data.metrics).items()})
            row.update({f"params.{k}": v for k, v in data.params.items()})
            row.update({f"tags.{k}": v for k, v in data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=_RUN_COLUMNS)
    return frame


def metric_histories(store: Store, run_ids: Sequence[str], keys: Iterable[str]) -> pd.DataFrame:
    """Every logged value of metrics `keys` for `run_ids`: columns run_id, key, step, value, timestamp.

    Reads in bulk where the store allows (one query per key for a sqlite/SQL store) and otherwise
    fetches run by run in a thread pool. When a step was logged twice (a resumed run), the later
    value wins. Sorted by run_id, key, step. A run of an older store answers under its flat name
    (`names.legacy_name`), reported as the key asked for.
    """
    run_ids = list(dict.fromkeys(run_ids))
    asked = {k: k for k in dict.fromkeys(keys)}
    if not run_ids or not asked:
        return pd.DataFrame(columns=_HISTORY_COLUMNS)
    asked.update({names.legacy_name(k): k for k in list(asked) if names.legacy_name(k) not in asked})
    frame = _histories(store, run_ids, list(asked))
    if frame.empty:
        return frame
    current = frame["key"].map(asked)
    logged_now = set(zip(frame["run_id"][frame["key"] == current], current[frame["key"] == current], strict=True))
    keep = [k == c or (r, c) not in logged_now for r, k, c in zip(frame["run_id"], frame["key"], current, strict=True)]
    frame = frame.assign(key=current)[keep]
    frame = frame.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
    frame = frame.drop_duplicates(["run_id", "key", "step"], keep="last")
    return frame.reset_index(drop=True)


def _histories(store: Store, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Every logged value of `keys` for `run_ids`, as stored (bulk where the backend allows)."""
    backend = getattr(getattr(store.client, "_tracking_client", None), "store", None)
    bulk = getattr(backend, "get_metric_history_bulk", None)
    records: list[tuple[str, str, int, float, int]] = []
    if callable(bulk):
        for key in keys:
            for start in range(0, len(run_ids), _BULK_CHUNK):
                chunk = run_ids[start : start + _BULK_CHUNK]
                for m in bulk(run_ids=chunk, metric_key=key, max_results=2**31 - 1):
                    records.append((m.run_id, m.key, m.step, m.value, m.timestamp))
    else:

        def one(pair: tuple[str, str]) -> list[tuple[str, str, int, float, int]]:
            run_id, key = pair
            return [(run_id, m.key, m.step, m.value, m.timestamp) for m in store.client.get_metric_history(run_id, key)]

        pairs = [(r, k) for r in run_ids for k in keys]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for chunk in pool.map(one, pairs):
                records.extend(chunk)
    return pd.DataFrame.from_records(records, columns=_HISTORY_COLUMNS)


# ------------------------------------------------------------------------------------------- artifacts


def _local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The directory of a run's artifacts when they live on this machine (file: URI or plain path)."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def read_artifact_bytes(store: Store, run_id: str, path: str, artifact_uri: str | None = None) -> bytes | None:
    """The bytes of artifact `path` of `run_id` (read in place when local, else downloaded), or None."""
    local_dir = _local_artifact_dir(artifact_uri)
    if local_dir is not None:
        try:
            return (local_dir / path).read_bytes()
        except OSError:
            return None
    with tempfile.TemporaryDirectory(prefix="harness-artifact-") as tmp:
        try:
            return Path(store.client.download_artifacts(run_id, path, dst_path=tmp)).read_bytes()
        except Exception:
            return None


def read_artifact_csv(store: Store, run_id: str, path: str, artifact_uri: str | None = None) -> pd.DataFrame | None:
    """The CSV artifact `path` of `run_id` as a DataFrame; None when the run has no such artifact.

    Artifacts on this machine (the run's `artifact_uri` is a local file URI, as with the default
    `results/mlartifacts`) are read in place; others are downloaded to a temporary directory.
    """
    from mlflow.exceptions import MlflowException

    local_dir = _local_artifact_dir(artifact_uri)
    if local_dir is not None:
        try:
            return pd.read_csv(local_dir / path)
        except (OSError, ValueError):
            return None
    with tempfile.TemporaryDirectory(prefix="harness-artifact-") as tmp:
        try:
            local = store.client.download_artifacts(run_id, path, dst_path=tmp)
            return pd.read_csv(local)
        except (MlflowException, OSError, ValueError):
            return None


def artifact_tables(
    store: Store,
    run_ids: Sequence[str],
    path: str,
    artifact_uris: Mapping[str, str] | None = None,
    workers: int = 8,
) -> pd.DataFrame:
    """`read_artifact_csv` for many runs (in a thread pool), concatenated with a `run_id` column.

    `artifact_uris` ({run_id: artifact_uri}, e.g. from `search_runs`) lets local artifacts be read in place.
    """
    run_ids = list(dict.fromkeys(run_ids))
    if not run_ids:
        return pd.DataFrame(columns=["run_id"])
    uris = artifact_uris or {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(run_ids)))) as pool:
        tables = list(pool.map(lambda rid: read_artifact_csv(store, rid, path, uris.get(rid)), run_ids))
    parts = [t.assign(run_id=rid) for rid, t in zip(run_ids, tables, strict=True) if t is not None and len(t)]
    if not parts:
        return pd.DataFrame(columns=["run_id"])
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------ synthetic runs (writer)


@dataclass
class FixtureRun:
    """One child run to log with `write_fixture_runs`, in the layout of docs/tracking.md."""

    name: str
    tags: Mapping[str, str]
    params: Mapping[str, Any]
    history: Mapping[str, Sequence[float]] = field(default_factory=dict)  # metric -> value per epoch 1..n
    final: Mapping[str, float] = field(default_factory=dict)  # per-run metrics, logged at step 0
    artifacts: Mapping[str, str] = field(default_factory=dict)  # artifact path -> text content
    status: str = "FINISHED"  # FINISHED, FAILED, RUNNING, KILLED


def write_fixture_runs(
    uri: str,
    experiment: str,
    runs: Sequence[FixtureRun],
    description: str = "",
    baseline: str | None = None,
    artifact_location: str | None = None,
    parent_tags: Mapping[str, str] | None = None,
) -> str:
    """Log `runs` as children of one parent run in experiment `experiment`; return the experiment id.

    For benchmarks and demos of the report (this module's only writer); creates the store if needed.
    """
    _quiet_mlflow_logs()
    settings.apply_mlflow_defaults()
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
    else:
        exp_id = found.experiment_id
    client.set_experiment_tag(exp_id, names.DESCRIPTION, description)
    if baseline is not None:
        client.set_experiment_tag(exp_id, names.BASELINE_VARIANT, baseline)
    parent_tags = {names.ROLE: names.PARENT, **(parent_tags or {})}
    parent = client.create_run(exp_id, run_name=f"{experiment}-parent", tags=parent_tags)
    parent_id = parent.info.run_id
    now = 1_700_000_000_000
    any_failed = False
    for run in runs:
        tags = {names.ROLE: names.CHILD, names.MLFLOW_PARENT: parent_id, **run.tags}
        created = client.create_run(exp_id, run_name=run.name, tags=tags)
        run_id = created.info.run_id
        metrics = [
            Metric(key, float(v), now + step, step)
            for key, values in run.history.items()
            for step, v in enumerate(values, start=1)
            if not (isinstance(v, float) and math.isnan(v))
        ]
        metrics += [Metric(key, float(v), now, 0) for key, v in run.final.items()]
        params = [Param(k, str(v)) for k, v in run.params.items()]
        for start in range(0, max(len(metrics), 1), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000], params=params if start == 0 else [])
        if run.artifacts:
            with tempfile.TemporaryDirectory(prefix="harness-fixture-") as tmp:
                for rel, text in run.artifacts.items():
                    local = Path(tmp, rel)
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_text(text)
                client.log_artifacts(run_id, tmp)
        if run.status != "RUNNING":
            client.set_terminated(run_id, status=run.status)
        any_failed = any_failed or run.status in ("FAILED", "KILLED")
    client.set_terminated(parent_id, status="FAILED" if any_failed else "FINISHED")
    return exp_id
