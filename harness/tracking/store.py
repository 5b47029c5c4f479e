"""The write side of MLflow: experiments, parent/child runs, metrics, artifacts, resume bookkeeping.

Uses `MlflowClient` with explicit run ids (no global active-run state), so nested runs, resumed runs
and several workers on one store stay unambiguous. What is written is listed in docs/tracking.md.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"
ROLE, PARENT, CHILD = "harness.role", "parent", "child"

# MLflow's HTTP client retries for minutes by default; a harness user wants a quick answer.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded sqlite store under results/."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def check_reachable(uri: str, create: bool) -> None:
    """Fail fast, in one line, when a store cannot be used (before anything is logged)."""
    db = _sqlite_path(uri)
    if db is not None:
        if db.exists():
            return
        if not create:
            raise HarnessError(f"no MLflow store at {db} (tracking URI {uri})")
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"tracking URI {uri}: cannot create {db.parent}: {exc.strerror}") from None
        if not os.access(db.parent, os.W_OK):
            raise HarnessError(f"tracking URI {uri}: {db.parent} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (user-given server)
                if response.status >= 400:
                    raise HarnessError(f"tracking server {uri} answered {response.status}")
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise HarnessError(f"tracking server {uri} answered {exc.code}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HarnessError(f"tracking server {uri} is unreachable: {reason}") from None
        return
    if uri.startswith(("file:", "/", ".")) or "://" not in uri:
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
        if not path.exists() and not create:
            raise HarnessError(f"no MLflow store at {path}")
        return
    if uri.split("://", 1)[0] in ("postgresql", "mysql", "mssql", "sqlite") or "+" in uri.split("://", 1)[0]:
        return  # database back ends: the first query below reports a connection problem
    raise HarnessError(f"unsupported tracking URI {uri!r}")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Artifacts of an embedded sqlite store live beside the database file."""
    db = _sqlite_path(uri)
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

        import time

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
        self.set_tags({"harness.failure": reason})
        self.finish("FAILED")


class AblationStore:
    """An ablation's experiment: its parent runs, child runs and resume bookkeeping."""

    def __init__(self, uri: str | None, ablation: str, description: str = "", baseline: str = "") -> None:
        self.uri = resolve_uri(uri)
        check_reachable(self.uri, create=True)
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
            raise HarnessError(f"tracking URI {self.uri}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        self.experiment_id = experiment_id
        self.client.set_experiment_tag(experiment_id, "harness.description", description)
        self.client.set_experiment_tag(experiment_id, "harness.baseline", baseline)

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
        return {r.data.tags.get("harness.config_hash") for r in self._children("FINISHED")}

    def child_by_hash(self, config_hash: str) -> Any | None:
        """The latest non-finished child run with this config hash, if any."""
        matches = [r for r in self._children() if r.data.tags.get("harness.config_hash") == config_hash
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
            if tags.get("harness.host") != host:
                continue
            pid = int(tags.get("harness.pid", "0") or 0)
            if pid and _pid_alive(pid):
                continue
            self.client.set_tag(run.info.run_id, "harness.stale", "marked KILLED by a later harness run")
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
            tags={"mlflow.parentRunId": parent_id, ROLE: CHILD, **{k: str(v) for k, v in tags.items()}},
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_artifact_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="harness-artifacts-")
