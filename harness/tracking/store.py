"""The write side of MLflow: experiments, parent/child runs, metrics, artifacts, resume bookkeeping.

Uses `MlflowClient` with explicit run ids (no global active-run state), so nested runs, resumed runs
and several workers on one store stay unambiguous. What is written is listed in docs/tracking.md.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import settings
from harness.errors import HarnessError, one_line
from harness.tracking import names
from harness.tracking.names import CHILD, PARENT, ROLE, STUDY_ROLE, TRIAL_ROLE
from harness.tracking.uri import check_store, resolve_uri, sqlite_path


def _client(uri: str) -> Any:
    settings.apply_mlflow_defaults()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts of an embedded sqlite store live beside the database file."""
    db = sqlite_path(uri)
    return (db.parent.resolve() / "mlartifacts").as_uri() if db is not None else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


class ChildRun:
    """One expanded run's MLflow record."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and v == v]
        for start in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 900], synchronous=True)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, reason: str) -> None:
        self.set_tags({names.FAILURE: reason})
        self.finish("FAILED")


class AblationStore:
    """An ablation's experiment: its parent runs, child runs and resume bookkeeping."""

    def __init__(self, uri: str | None, ablation: str, description: str = "", baseline: str = "") -> None:
        self.uri = resolve_uri(uri)
        check_store(self.uri, create=True)
        self.client = _client(self.uri)
        try:
            experiment = self.client.get_experiment_by_name(ablation)
            if experiment is None:
                experiment_id = self.client.create_experiment(ablation, artifact_location=_artifact_root(self.uri))
            else:
                if experiment.lifecycle_stage == "deleted":
                    self.client.restore_experiment(experiment.experiment_id)
                experiment_id = experiment.experiment_id
        except HarnessError:
            raise
        except Exception as exc:  # connection problems surface here for database back ends
            raise HarnessError(f"tracking URI {self.uri}: {one_line(exc)}") from None
        self.experiment_id = experiment_id
        self.client.set_experiment_tag(experiment_id, names.DESCRIPTION, description)
        self.client.set_experiment_tag(experiment_id, names.BASELINE_VARIANT, baseline)

    def _children(self, status: str | None = None) -> list[Any]:
        query = f"tags.`{ROLE}` = '{CHILD}'" + (f" and attributes.status = '{status}'" if status else "")
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def finished_hashes(self) -> set[str]:
        """Config hashes of child runs that FINISHED: these are skipped on a rerun."""
        return {r.data.tags.get(names.CONFIG_HASH) for r in self._children("FINISHED")}

    def child_by_hash(self, config_hash: str) -> Any | None:
        """The latest non-finished child run with this config hash, if any."""
        matches = [r for r in self._children() if r.data.tags.get(names.CONFIG_HASH) == config_hash
                   and r.info.status != "FINISHED"]
        return max(matches, key=lambda r: r.info.start_time or 0) if matches else None

    def mark_stale_running(self, alive: set[str] | None = None) -> list[str]:
        """Mark RUNNING runs whose process is gone as KILLED; return their names.

        A run records its host and pid; on this host a dead pid means the run is stale. Runs of
        other hosts are left alone unless their host is this one.
        """
        host = socket.gethostname()
        stale = []
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
            tags = run.data.tags
            if run.info.run_id in (alive or set()):
                continue
            if tags.get(names.HOST) != host:
                continue
            pid = int(tags.get(names.PID, "0") or 0)
            if pid and pid_alive(pid):
                continue
            self.client.set_tag(run.info.run_id, names.STALE, "marked KILLED by a later harness run")
            self.client.set_terminated(run.info.run_id, status="KILLED")
            stale.append(run.info.run_name)
        return stale

    def start_parent(self, name: str, tags: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={ROLE: PARENT, **{k: str(v) for k, v in tags.items()}}
        )
        return run.info.run_id

    def finish_parent(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def start_child(
        self, parent_id: str, name: str, params: Mapping[str, Any], tags: Mapping[str, Any]
    ) -> ChildRun:
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={names.MLFLOW_PARENT: parent_id, ROLE: CHILD, **{k: str(v) for k, v in tags.items()}},
        )
        child = ChildRun(self.client, run.info.run_id)
        batch = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(batch), 90):
            self.client.log_batch(run.info.run_id, params=batch[start : start + 90])
        return child

    def reopen_child(self, run_id: str, tags: Mapping[str, Any]) -> ChildRun:
        """Continue logging into an interrupted child run (status back to RUNNING)."""
        self.client.update_run(run_id, status="RUNNING")
        child = ChildRun(self.client, run_id)
        child.set_tags(tags)
        return child


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



# --- Optuna studies (harness tune): a parent run per study, a nested run per trial ----------------------------


def start_study_run(store: AblationStore, study: str, tags: Mapping[str, Any]) -> str:
    """The study's parent run (tag harness.role=study, harness.study=<name>): reopened if it exists, else created.

    Callers that run concurrently on one study serialise this call themselves (harness.tune holds its
    storage lock), so a study gets exactly one parent run.
    """
    query = f"tags.`{ROLE}` = '{STUDY_ROLE}' and tags.`{names.STUDY}` = '{_quoted(study)}'"
    found = store.client.search_runs(
        [store.experiment_id], query, max_results=1, order_by=["attributes.start_time ASC"]
    )
    clean = {k: str(v) for k, v in tags.items()}
    if found:
        run_id = found[0].info.run_id
        store.client.update_run(run_id, status="RUNNING")
        ChildRun(store.client, run_id).set_tags(clean)
        return run_id
    run = store.client.create_run(
        store.experiment_id, run_name=f"study {study}", tags={ROLE: STUDY_ROLE, names.STUDY: study, **clean}
    )
    return run.info.run_id


def start_trial_run(
    store: AblationStore, parent_id: str, name: str, params: Mapping[str, Any], tags: Mapping[str, Any]
) -> ChildRun:
    """A trial's run nested under its study's run (tag harness.role=trial; never harness.role=child)."""
    from mlflow.entities import Param

    run = store.client.create_run(
        store.experiment_id,
        run_name=name,
        tags={names.MLFLOW_PARENT: parent_id, ROLE: TRIAL_ROLE, **{k: str(v) for k, v in tags.items()}},
    )
    batch = [Param(k, _param_value(v)) for k, v in params.items()]
    for start in range(0, len(batch), 90):
        store.client.log_batch(run.info.run_id, params=batch[start : start + 90])
    return ChildRun(store.client, run.info.run_id)


def study_run(store: AblationStore, run_id: str) -> ChildRun:
    """A handle to tag, log to and finish a study's parent run."""
    return ChildRun(store.client, run_id)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


# --- analysis (harness eval): find finished child runs; log more into a run without changing its status ---------


class RunRecord:
    """What the analysis needs to know about one run: ids, name, status, tags, params, artifact location."""

    def __init__(self, run: Any, experiment: str) -> None:
        self.run_id: str = run.info.run_id
        self.name: str = run.info.run_name or run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.experiment: str = experiment
        self.status: str = run.info.status
        self.tags: dict[str, str] = dict(run.data.tags)
        self.params: dict[str, str] = dict(run.data.params)
        self.artifact_uri: str = run.info.artifact_uri

    def __repr__(self) -> str:
        return f"RunRecord({self.name!r}, {self.run_id}, {self.status})"


def _reader_client(uri: str | None) -> tuple[str, Any]:
    resolved = resolve_uri(uri)
    check_store(resolved, create=False)
    return resolved, _client(resolved)


def _finished_children(client: Any, experiment_id: str, query: str) -> tuple[list[Any], int]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return sorted(finished, key=lambda r: r.info.run_name or ""), len(runs)


def find_finished_runs(uri: str | None, ref: str) -> list[RunRecord]:
    """The FINISHED child runs `ref` names: an ablation (experiment) name, a child run id or a parent run id.

    Raises `HarnessError` for an unknown name or id, an ablation or parent without finished child
    runs, and a child run that did not finish.
    """
    resolved, client = _reader_client(uri)
    try:
        experiment = client.get_experiment_by_name(ref)
    except Exception as exc:  # connection problems of database back ends surface here
        raise HarnessError(f"tracking URI {resolved}: {one_line(exc)}") from None
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        runs, total = _finished_children(client, experiment.experiment_id, f"tags.`{ROLE}` = '{CHILD}'")
        if not runs:
            what = f"no finished runs ({total} unfinished)" if total else "no runs"
            raise HarnessError(f"ablation {ref!r} has {what} in {resolved}")
        return [RunRecord(r, experiment.name) for r in runs]
    try:
        run = client.get_run(ref)
    except Exception:
        raise HarnessError(f"no ablation or run {ref!r} in {resolved}") from None
    experiment_name = client.get_experiment(run.info.experiment_id).name
    role = run.data.tags.get(ROLE)
    if role == PARENT:
        query = f"tags.`mlflow.parentRunId` = '{_quoted(run.info.run_id)}'"
        runs, total = _finished_children(client, run.info.experiment_id, query)
        if not runs:
            raise HarnessError(f"parent run {ref} of ablation {experiment_name!r} has no finished child runs")
        return [RunRecord(r, experiment_name) for r in runs]
    if role != CHILD:
        raise HarnessError(f"run {ref} is not a harness training run (tag {ROLE} is {role!r}, expected {CHILD!r})")
    if run.info.status != "FINISHED":
        raise HarnessError(f"run {run.info.run_name} ({ref}) is {run.info.status}: only finished runs are evaluated")
    return [RunRecord(run, experiment_name)]


def attach_run(uri: str | None, run_id: str) -> ChildRun:
    """A handle to log more metrics, tags and artifacts into an existing run; its status is left as it is."""
    _, client = _reader_client(uri)
    return ChildRun(client, run_id)


def read_run_text(run: ChildRun, path: str) -> str | None:
    """A text artifact of `run` (e.g. config.yaml), or None when it has none."""
    with tempfile.TemporaryDirectory(prefix="harness-read-") as tmp:
        try:
            local = run.client.download_artifacts(run.run_id, path, tmp)
            return Path(local).read_text(encoding="utf-8")
        except Exception:
            return None


def log_artifact_dir(run: ChildRun, local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Upload every file under `local_dir` into `run`'s artifacts (under `artifact_path`), replacing same names."""
    run.client.log_artifacts(run.run_id, str(local_dir), artifact_path)
