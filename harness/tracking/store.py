"""The write side of MLflow: experiments, parent/child runs, metrics, artifacts, resume bookkeeping.

Uses `MlflowClient` with explicit run ids (no global active-run state), so nested runs, resumed runs
and several workers on one store stay unambiguous. What is written is listed in docs/tracking.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from harness import settings
from harness.errors import HarnessError, one_line
from harness.tracking import names
from harness.tracking.locks import StorageLock
from harness.tracking.names import CHILD, PARENT, ROLE, STUDY_ROLE, TRIAL_ROLE
from harness.tracking.retry import RetryingClient
from harness.tracking.uri import check_store, resolve_uri, sqlite_path


def _client(uri: str) -> Any:
    settings.apply_mlflow_defaults()
    from mlflow.tracking import MlflowClient

    return RetryingClient(MlflowClient(tracking_uri=uri), uri)  # waits out a restarted tracking server


def _artifact_root(uri: str) -> str | None:
    """Artifacts of an embedded sqlite store live beside the database file."""
    db = sqlite_path(uri)
    return (db.parent.resolve() / "mlartifacts").as_uri() if db is not None else None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


# --- ownership: one live process trains a run ----------------------------------------------------------------
# A process owns a child run through a claim: a param `harness.claim.<n>` = "<host> <pid> <unix time>".
# MLflow refuses to log a param twice with different values, so of two processes claiming the same
# run at once exactly one succeeds. A claim is live while its process runs (same host: the pid exists;
# another host: its heartbeat tag, or the claim itself, is younger than STALE_AFTER_S).
CLAIM_PREFIX = "harness.claim."
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def this_process() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def _claim_value() -> str:
    host, pid = this_process()
    return f"{host} {pid} {time.time():.0f}"


def latest_claim(params: Mapping[str, str]) -> tuple[int, str] | None:
    """(index, value) of a run's newest claim, if it has any."""
    claims = [(int(k.removeprefix(CLAIM_PREFIX)), v) for k, v in params.items()
              if k.startswith(CLAIM_PREFIX) and k.removeprefix(CLAIM_PREFIX).isdigit()]
    return max(claims) if claims else None


def owner_alive(owner: str, heartbeat: str | None = None, now: float | None = None) -> bool:
    """Whether the process a claim names still runs: its pid on this host, a recent sign of life elsewhere."""
    host, _, rest = owner.partition(" ")
    pid_text, _, since_text = rest.partition(" ")
    if host == socket.gethostname():
        return pid_text.isdigit() and pid_alive(int(pid_text))
    signs = [float(t) for t in (since_text, heartbeat) if t and t.replace(".", "", 1).isdigit()]
    if not signs:
        return True  # another host that leaves no sign of life: assume it works, never take its run
    return (now or time.time()) - max(signs) < STALE_AFTER_S


def run_owner(run: Any) -> str | None:
    """'<host> <pid> <since>' of the process that owns `run` by its latest claim, else by its host/pid tags."""
    claim = latest_claim(run.data.params)
    if claim is not None:
        return claim[1]
    tags = run.data.tags
    return f"{tags[names.HOST]} {tags.get(names.PID, '0')}" if names.HOST in tags else None


def owned_by_another_live_process(run: Any) -> str | None:
    """The owner of a RUNNING run when that is a live process other than this one, else None."""
    owner = run_owner(run)
    if owner is None:
        return None
    host, pid = this_process()
    if owner.split(" ")[:2] == [host, str(pid)]:
        return None
    return owner if owner_alive(owner, run.data.tags.get(names.HEARTBEAT)) else None


class ChildRun:
    """One expanded run's MLflow record."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
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
        """End the run; a run that FINISHED drops the failure and stale marks of its earlier attempts."""
        if status == "FINISHED":
            tags = self.client.get_run(self.run_id).data.tags
            for key in (names.FAILURE, names.STALE):
                if key in tags:
                    self.client.delete_tag(self.run_id, key)
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, reason: str) -> None:
        self.set_tags({names.FAILURE: reason})
        self.finish("FAILED")

    def heartbeat(self) -> None:
        self.set_tags({names.HEARTBEAT: f"{time.time():.0f}"})

    @contextlib.contextmanager
    def keep_alive(self, interval_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Beat every `interval_s` while the body runs, so processes on other hosts see this run is owned."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval_s):
                with contextlib.suppress(Exception):  # a missed beat is not a failure of the run
                    self.heartbeat()

        self.heartbeat()
        thread = threading.Thread(target=beat, daemon=True, name="harness-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


class AblationStore:
    """An ablation's experiment: its parent runs, child runs and resume bookkeeping."""

    def __init__(self, uri: str | None, ablation: str, description: str = "", baseline: str = "") -> None:
        self.ablation = ablation
        self.uri = resolve_uri(uri)
        check_store(self.uri, create=True)
        try:
            with StorageLock(self.uri):  # two processes on a new store: one creates its schema and experiment
                self.client = _client(self.uri)
                experiment_id = self._experiment_id(ablation)
        except HarnessError:
            raise
        except Exception as exc:  # connection problems surface here for database back ends
            raise HarnessError(f"tracking URI {self.uri}: {one_line(exc)}") from None
        self.experiment_id = experiment_id
        self.description = description
        experiment_tags = {names.DESCRIPTION: description, names.BASELINE_VARIANT: baseline,
                           names.MLFLOW_EXPERIMENT_KIND: names.EXPERIMENT_KIND_TRAINING, names.MLFLOW_NOTE: description}
        for key, value in experiment_tags.items():
            try:
                self.client.set_experiment_tag(experiment_id, key, value)
            except Exception:  # workers starting together on a tracking server race in its insert-or-update
                self.client.set_experiment_tag(experiment_id, key, value)

    def note(self, run_name: str = "") -> str:
        """The Markdown description the MLflow UI shows on a run: the ablation's description, the run named."""
        head = f"**{run_name}** of ablation `{self.ablation}`\n\n" if run_name else ""
        return head + self.description

    def _experiment_id(self, ablation: str) -> str:
        experiment = self.client.get_experiment_by_name(ablation)
        if experiment is None:
            try:
                return self.client.create_experiment(ablation, artifact_location=_artifact_root(self.uri))
            except Exception as exc:  # a tracking server has no StorageLock: another worker created it first
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(ablation)
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _children(self, status: str | None = None) -> list[Any]:
        query = f"tags.`{ROLE}` = '{CHILD}'" + (f" and attributes.status = '{status}'" if status else "")
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def children(self) -> list[Any]:
        """Every child run of the ablation (MLflow `Run`s), whatever its status."""
        return self._children()

    def finished_hashes(self) -> set[str]:
        """Config hashes of child runs that FINISHED: these are skipped on a rerun."""
        return {r.data.tags.get(names.CONFIG_HASH) for r in self._children("FINISHED")}

    def child_by_hash(self, config_hash: str) -> Any | None:
        """The latest non-finished child run with this config hash, if any."""
        matches = [r for r in self._children() if r.data.tags.get(names.CONFIG_HASH) == config_hash
                   and r.info.status != "FINISHED"]
        return max(matches, key=lambda r: r.info.start_time or 0) if matches else None

    def mark_stale_running(self) -> list[str]:
        """Mark RUNNING runs whose owner is gone as KILLED; return their names.

        On this host a dead pid means the run is stale; on another host, a heartbeat older than
        STALE_AFTER_S. Runs without an owner (study runs) and runs of this process are left alone.
        """
        stale = []
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
            owner = run_owner(run)
            if owner is None or owner.split(" ")[:2] == [str(p) for p in this_process()]:
                continue
            if owner_alive(owner, run.data.tags.get(names.HEARTBEAT)):
                continue
            self.client.set_tag(run.info.run_id, names.STALE, "marked KILLED by a later harness run")
            self.client.set_terminated(run.info.run_id, status="KILLED")
            stale.append(run.info.run_name)
        return stale

    def busy_hashes(self) -> dict[str, str]:
        """Config hash → owner of every RUNNING child run that a live process other than this one trains."""
        busy = {}
        for run in self._children("RUNNING"):
            owner = owned_by_another_live_process(run)
            if owner is not None:
                busy[run.data.tags.get(names.CONFIG_HASH, "")] = owner
        return busy

    def claim(self, run_id: str) -> bool:
        """Take an interrupted child run to resume it. False when a live process owns it, or claimed it at
        the same moment (MLflow keeps only the first value of a param: exactly one claim succeeds)."""
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(run_id)
        latest = latest_claim(run.data.params)
        if latest is not None:
            owner = owned_by_another_live_process(run)
            since = float(latest[1].split(" ")[2]) if latest[1].count(" ") == 2 else 0.0
            if owner is not None and (run.info.status == "RUNNING" or time.time() - since < 60):
                return False
        index = 0 if latest is None else latest[0] + 1
        try:
            self.client.log_param(run_id, f"{CLAIM_PREFIX}{index}", _claim_value())
        except MlflowException:
            return False
        return True

    def exclusive(self) -> contextlib.AbstractContextManager[Any]:
        """Held while a process decides which run it trains and creates or claims it, so that two processes
        cannot both see a config as free (a database store; an HTTP tracking server has no such lock and
        relies on `first_claim`)."""
        return StorageLock(self.uri)

    def first_claim(self, child: ChildRun, config_hash: str) -> bool:
        """After a new child run is created: True when no run of the same config FINISHED and no live
        process trains an earlier one; otherwise the new run is deleted and False returned (processes
        that created runs of one config at the same moment all agree which is first: the earliest by
        start time, then run id)."""
        if not StorageLock(self.uri).locks:
            time.sleep(settings.current().claim_settle_s)  # a rival created a moment earlier becomes visible
        mine = self.client.get_run(child.run_id)

        def order(run: Any) -> tuple[int, str]:
            return run.info.start_time or 0, run.info.run_id

        same = [r for r in self._children() if r.data.tags.get(names.CONFIG_HASH) == config_hash
                and r.info.run_id != child.run_id]
        finished = any(r.info.status == "FINISHED" for r in same)
        earlier = any(r.info.status == "RUNNING" and order(r) < order(mine)
                      and owned_by_another_live_process(r) is not None for r in same)
        if finished or earlier:
            self.client.delete_run(child.run_id)
            return False
        return True

    def start_parent(self, name: str, tags: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={ROLE: PARENT, names.MLFLOW_NOTE: self.note(), **{k: str(v) for k, v in tags.items()}},
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
            tags={names.MLFLOW_PARENT: parent_id, ROLE: CHILD, names.MLFLOW_NOTE: self.note(name),
                  **{k: str(v) for k, v in tags.items()}},
        )
        child = ChildRun(self.client, run.info.run_id)
        batch = [Param(k, _param_value(v)) for k, v in {**params, f"{CLAIM_PREFIX}0": _claim_value()}.items()]
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
