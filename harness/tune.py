"""Optuna learning-rate searches (`harness tune`): one study per variant, trials trained by `harness.train.fit`.

An ablation file's `search:` section (`harness.spec.SearchSpec`) names the ranges, the objective (a val
metric, best over epochs), the number of trials, the sampler and the pruner. Each variant (and each
non-seed grid point) gets its own study `<ablation>.<variant>[/<axis>=<value>...]`, trained at the
first seed of the grid. Every epoch is reported to Optuna, so a pruner can stop a bad rate early; the
trial's true end state (COMPLETE, PRUNED, FAIL) is kept in Optuna and mirrored in MLflow (a parent run
per study, a nested run per trial). `best_lr_from_study` is what `train.lr: {from_study: NAME}` reads.

Trials are created under a storage-wide lock (a lock file beside a sqlite database, an advisory lock on
PostgreSQL / MySQL) that also counts the study's trials, so any number of workers (threads of one
process, processes, machines) sharing a storage together run exactly `n_trials`. See docs/tuning.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import socket
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from harness.errors import HarnessError
from harness.spec import (
    AblationSpec,
    FloatRange,
    HyperbandPrunerSpec,
    MedianPrunerSpec,
    PlannedRun,
    RunConfig,
    SearchSpec,
    _format_validation_error,
    _merge,
    flatten,
)
from harness.tracking.store import ensure_writable_dir, pid_alive

if TYPE_CHECKING:
    import optuna
    import pandas as pd

DEFAULT_STORAGE = "sqlite:///results/optuna.db"
STORAGE_ENV = "HARNESS_OPTUNA_STORAGE"

# Optuna trial user attributes written by harness tune.
HOST, PID, RUN_ID, FAILURE, INTERRUPTED, PRUNED_AT = (
    "harness.host", "harness.pid", "harness.mlflow_run_id", "harness.failure", "harness.interrupted",
    "harness.pruned_at_epoch",
)
# Optuna study user attributes.
METRIC, DIRECTION, ABLATION, VARIANT, GRID, ENQUEUED = (
    "harness.metric", "harness.direction", "harness.ablation", "harness.variant", "harness.grid", "harness.enqueued",
)
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"harness.tune").digest()[:8], "big", signed=True)


# --------------------------------------------------------------------------------------------- storage


def resolve_storage(storage: str | None) -> str:
    """--storage, else $HARNESS_OPTUNA_STORAGE, else sqlite:///results/optuna.db."""
    return storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """The storage URL with its password hidden (for messages and tags)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _family(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return {"postgres": "postgresql", "mariadb": "mysql"}.get(scheme.split("+")[0], scheme.split("+")[0])


def _sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite URL (None for in-memory databases)."""
    path = url.split("://", 1)[1].removeprefix("/") if "://" in url else ""
    if path in ("", ":memory:") or path.startswith(":memory:") or path.startswith("file:"):
        return None
    return Path(path.split("?", 1)[0])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
_LOCK_ENGINES: dict[str, Any] = {}


class StorageLock:
    """Mutual exclusion between every `harness tune` worker of one storage: threads, processes, machines.

    sqlite: `flock` on `<database>.lock` (workers on one machine, as sqlite itself needs); PostgreSQL:
    `pg_advisory_lock`; MySQL: `GET_LOCK`. Held only while trials are counted and created (milliseconds).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.family = _family(url)
        with _THREAD_LOCKS_GUARD:
            self._thread_lock = _THREAD_LOCKS.setdefault(url, threading.Lock())
        self._release: Callable[[], None] | None = None

    def __enter__(self) -> StorageLock:
        self._thread_lock.acquire()
        try:
            self._release = self._acquire()
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._release is not None:
                self._release()
        finally:
            self._release = None
            self._thread_lock.release()

    def _acquire(self) -> Callable[[], None]:
        if self.family == "sqlite":
            db = _sqlite_file(self.url)
            if db is None:
                return lambda: None
            try:
                import fcntl
            except ImportError:  # not POSIX: one process per sqlite storage
                return lambda: None
            handle = open(db.with_name(db.name + ".lock"), "a+")  # noqa: SIM115 (closed by the release)
            fcntl.flock(handle, fcntl.LOCK_EX)

            def release() -> None:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()

            return release
        if self.family in ("postgresql", "mysql"):
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            with _THREAD_LOCKS_GUARD:
                engine = _LOCK_ENGINES.get(self.url)
                if engine is None:
                    engine = _LOCK_ENGINES[self.url] = create_engine(self.url, poolclass=NullPool)
            connection = engine.connect()
            try:
                if self.family == "postgresql":
                    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
                    unlock = text("SELECT pg_advisory_unlock(:key)")
                    unlock_args: dict[str, Any] = {"key": _LOCK_KEY}
                else:
                    got = connection.execute(text("SELECT GET_LOCK('harness.tune', 600)")).scalar()
                    if got != 1:
                        raise HarnessError(f"storage {mask_url(self.url)}: waited 600 s for the harness.tune lock")
                    unlock, unlock_args = text("SELECT RELEASE_LOCK('harness.tune')"), {}
            except BaseException:
                connection.close()
                raise

            def release_db() -> None:
                try:
                    connection.execute(unlock, unlock_args)
                finally:
                    connection.close()

            return release_db
        return lambda: None


def open_storage(url: str | None = None, *, create: bool = True) -> optuna.storages.RDBStorage:
    """The Optuna storage at `url` (see `resolve_storage`), checked and ready; a HarnessError when it is not.

    `create=False` (reading) refuses a sqlite file that does not exist instead of creating it.
    """
    import optuna

    url = resolve_storage(url)
    family = _family(url)
    if family not in ("sqlite", "postgresql", "mysql"):
        raise HarnessError(
            f"unsupported Optuna storage {mask_url(url)!r}: use sqlite:///PATH, postgresql://… or mysql://…"
        )
    engine_kwargs: dict[str, Any] = {}
    if family == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
        db = _sqlite_file(url)
        if db is not None:
            if not db.exists():
                if not create:
                    raise HarnessError(
                        f"no Optuna storage at {db}: run `harness tune` first, or pass the storage URL "
                        f"(--storage / ${STORAGE_ENV})"
                    )
                ensure_writable_dir(db.parent, f"Optuna storage {url}")
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with StorageLock(url) if create else contextlib.nullcontext():  # schema creation, once
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except HarnessError:
        raise
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError):
            drivers = {"psycopg": "psycopg psycopg-binary", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                       "pymysql": "pymysql"}
            hint = f" (install its driver: pip install {drivers.get(exc.name or '', exc.name)})"
        raise HarnessError(f"cannot open Optuna storage {mask_url(url)}: {_one_line(exc)}{hint}") from None


def _load_study(storage: Any, name: str, url: str) -> optuna.Study:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        known = ", ".join(sorted(names)[:20]) + (" …" if len(names) > 20 else "") if names else "none"
        raise HarnessError(f"no Optuna study {name!r} in {mask_url(url)} (studies: {known})") from None


# --------------------------------------------------------------------------------------------- reading


def best_lr_from_study(name: str, storage: str | None = None) -> float:
    """The learning rate of the best COMPLETE trial of study `name` (what `lr: {from_study: NAME}` trains at).

    `storage` defaults to $HARNESS_OPTUNA_STORAGE, else sqlite:///results/optuna.db. A HarnessError when
    the storage or study does not exist, or the study has no completed trial.
    """
    import optuna

    url = resolve_storage(storage)
    study = _load_study(open_storage(url, create=False), name, url)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        counts = _state_counts(study.get_trials(deepcopy=False))
        summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "no trials"
        raise HarnessError(f"Optuna study {name!r} has no completed trial yet ({summary}): run `harness tune` on it")
    best = study.best_trial
    if "lr" not in best.params:
        raise HarnessError(f"Optuna study {name!r} did not search lr (its params: {', '.join(best.params)})")
    return float(best.params["lr"])


def study_names(storage: str | None = None) -> list[str]:
    """Every study in the storage, sorted."""
    import optuna

    return sorted(optuna.get_all_study_names(open_storage(storage, create=False)))


def study_frames(storage: str | None = None, names: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Each study's trials as a DataFrame, for plots of lr vs objective and of the optimisation history.

    Columns: `number`, `state` (COMPLETE/PRUNED/FAIL/RUNNING/WAITING), `value` (the objective: best over
    epochs; a pruned trial's last reported value), `params_<name>` per searched parameter (`params_lr`, …),
    `intermediate_values` ({epoch: metric value}), `datetime_start`, `datetime_complete`, `duration_s`,
    `mlflow_run_id`, `failure`. `frame.attrs` holds `metric`, `direction`, `ablation`, `variant`,
    `best_trial`, `best_value` and `best_params` (None when no trial completed).
    """
    import optuna
    import pandas as pd

    url = resolve_storage(storage)
    opened = open_storage(url, create=False)
    wanted = names if names is not None else sorted(optuna.get_all_study_names(opened))
    frames: dict[str, pd.DataFrame] = {}
    for name in wanted:
        study = _load_study(opened, name, url)
        rows = []
        for t in study.get_trials(deepcopy=False):
            start, end = t.datetime_start, t.datetime_complete
            rows.append({
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **{f"params_{k}": v for k, v in t.params.items()},
                "intermediate_values": dict(sorted(t.intermediate_values.items())),
                "datetime_start": start,
                "datetime_complete": end,
                "duration_s": (end - start).total_seconds() if start and end else None,
                "mlflow_run_id": t.user_attrs.get(RUN_ID),
                "failure": t.user_attrs.get(FAILURE),
            })
        frame = pd.DataFrame(rows, columns=_frame_columns(rows)).sort_values("number").reset_index(drop=True)
        attrs = study.user_attrs
        best = _best(study)
        frame.attrs.update({
            "metric": attrs.get(METRIC), "direction": study.direction.name.lower(),
            "ablation": attrs.get(ABLATION), "variant": attrs.get(VARIANT),
            "best_trial": best.number if best else None, "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else None,
        })
        frames[name] = frame
    return frames


def _frame_columns(rows: list[dict[str, Any]]) -> list[str]:
    fixed = ["number", "state", "value"]
    params = sorted({k for row in rows for k in row if k.startswith("params_")},
                    key=lambda k: (k != "params_lr", k))
    rest = ["intermediate_values", "datetime_start", "datetime_complete", "duration_s", "mlflow_run_id", "failure"]
    return fixed + params + rest


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial
        return None


def _state_counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------- planning


@dataclass
class PlannedStudy:
    """One study: a variant at one non-seed grid point, trained at its first seed."""

    name: str
    variant: str
    grid: dict[str, Any]  # the non-seed grid point
    run: PlannedRun  # the first-seed run whose config every trial starts from
    search: SearchSpec


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` items → (`search.*` keys without the prefix, every other key)."""
    search = {k.removeprefix("search."): v for k, v in overrides.items() if k.startswith("search.")}
    return search, {k: v for k, v in overrides.items() if not k.startswith("search.")}


def resolve_search(spec: AblationSpec, overrides: dict[str, Any] | None = None, source: str = "ablation") -> SearchSpec:
    """The file's `search:` section with `--set search.<key>=...` applied; a HarnessError if it has none."""
    if spec.search is None:
        raise HarnessError(
            f"{source}: no `search:` section, so there is nothing to tune (see docs/tuning.md for its keys)"
        )
    if not overrides:
        return spec.search
    merged = _merge(spec.search.model_dump(mode="json", exclude_none=True), overrides)
    try:
        return SearchSpec.model_validate(merged)
    except ValidationError as exc:
        raise HarnessError(_format_validation_error(f"{source} with --set", exc, "search")) from None


def study_name(ablation: str, variant: str, grid: dict[str, Any]) -> str:
    """`<ablation>.<variant>`, plus `/<axis>=<value>` per non-seed grid axis."""
    return f"{ablation}.{variant}" + "".join(f"/{k}={v}" for k, v in grid.items() if k != "seed")


def plan_studies(spec: AblationSpec, search: SearchSpec, runs: list[PlannedRun]) -> list[PlannedStudy]:
    """Group expanded runs into studies (variant × non-seed grid point), each at its first run's seed."""
    studies: dict[str, PlannedStudy] = {}
    for run in runs:
        point = {k: v for k, v in run.grid.items() if k != "seed"}
        name = study_name(spec.name, run.variant, point)
        if name not in studies:
            studies[name] = PlannedStudy(name, run.variant, point, run, search)
    return list(studies.values())


# --------------------------------------------------------------------------------------------- tuning


@dataclass
class TuneOptions:
    storage: str | None = None  # default: $HARNESS_OPTUNA_STORAGE, else sqlite:///results/optuna.db
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db
    n_trials: int | None = None  # overrides search.n_trials
    n_jobs: int = 1  # trials run in threads of this process
    device: str | None = None  # overrides train.device
    results_dir: Path = Path("results")  # data caches and the generated synthetic task
    source_file: str = ""


@dataclass
class TrialResult:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: dict[str, Any]
    value: float | None = None
    epochs: int = 0
    reason: str = ""
    run_id: str = ""


@dataclass
class StudyOutcome:
    name: str
    variant: str
    metric: str
    direction: str
    target: int
    new_trials: int
    counts: dict[str, int]  # trials by state, all workers
    counted: int = 0  # trials that count toward the target (all but WAITING and interrupted ones)
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str = ""
    results: list[TrialResult] = field(default_factory=list)  # this process's trials

    @property
    def best_lr(self) -> float | None:
        return self.best_params.get("lr")

    @property
    def interrupted(self) -> int:
        """FAIL trials that do not count: stopped by Ctrl-C or by their worker's death."""
        return sum(self.counts.values()) - self.counts["WAITING"] - self.counted


class TuneEvents:
    """What `tune` reports while it works; these defaults ignore it (the CLI draws it with rich).

    Called from worker threads.
    """

    def study_started(self, study: PlannedStudy, target: int, counted: int) -> None: ...
    def data_progress(self, phase: str, done: int, total: int) -> None: ...
    def trial_started(self, study: PlannedStudy, number: int, params: dict[str, Any]) -> None: ...
    def epoch(self, study: PlannedStudy, number: int, epoch: int, value: float) -> None: ...
    def trial_finished(self, study: PlannedStudy, result: TrialResult) -> None: ...
    def study_finished(self, outcome: StudyOutcome) -> None: ...


SilentTuneEvents = TuneEvents


class _Interrupted(BaseException):
    """Raised inside a trial of a worker thread after Ctrl-C reached the main thread."""


def _distributions(search: SearchSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out: dict[str, Any] = {}
    for name, space in search.space.items():
        if isinstance(space, FloatRange):
            out[name] = FloatDistribution(space.low, space.high, log=space.log)
        else:
            out[name] = CategoricalDistribution(space.choices)
    return out


def _sampler(search: SearchSpec, number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded with seed + the trial's number: reproducible with one worker, distinct across workers."""
    from optuna.samplers import TPESampler

    return TPESampler(seed=search.sampler.seed + number, n_startup_trials=search.sampler.n_startup_trials)


def _pruner(search: SearchSpec, epochs: int) -> optuna.pruners.BasePruner:
    from optuna.pruners import HyperbandPruner, MedianPruner, NopPruner

    p = search.pruner
    if isinstance(p, MedianPrunerSpec):
        return MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                            interval_steps=p.interval_steps)
    if isinstance(p, HyperbandPrunerSpec):
        return HyperbandPruner(min_resource=p.min_resource, max_resource=p.max_resource or epochs,
                               reduction_factor=p.reduction_factor)
    return NopPruner()




def tune(
    spec: AblationSpec, studies: list[PlannedStudy], options: TuneOptions, events: TuneEvents | None = None
) -> list[StudyOutcome]:
    """Run each study until it holds its target number of trials; return one outcome per study.

    The target is `options.n_trials` or `search.n_trials` and counts every trial the study already has
    (COMPLETE, PRUNED, FAIL, or RUNNING in a live worker), whoever ran it: a rerun after completion runs
    nothing, an interrupted search runs only what is missing. Trials interrupted by Ctrl-C or by a killed
    worker end FAIL (tag `harness.interrupted`) and do not count.
    """
    from harness.tracking.store import AblationStore

    events = events or SilentTuneEvents()
    if options.n_trials is not None and options.n_trials < 1:
        raise HarnessError(f"--n-trials {options.n_trials}: give at least 1")
    if options.n_jobs < 1:
        raise HarnessError(f"--n-jobs {options.n_jobs}: give at least 1")
    url = resolve_storage(options.storage)
    storage = open_storage(url, create=True)
    with StorageLock(url):  # workers started together must not race to create the MLflow tables and experiment
        store = AblationStore(options.tracking_uri, spec.name, spec.description, spec.baseline_variant)
    store.mark_stale_running()
    from harness.runner import DataCache

    data_cache = DataCache(options.results_dir)
    return [_tune_study(study, spec, storage, url, store, data_cache, options, events) for study in studies]


@dataclass
class _Context:
    """What the workers of one study share."""

    study: PlannedStudy
    storage: Any
    url: str
    store: Any
    parent_id: str
    config: RunConfig
    data: Any
    device: Any
    target: int
    events: TuneEvents
    stop: threading.Event
    results: list[TrialResult] = field(default_factory=list)
    guard: threading.Lock = field(default_factory=threading.Lock)


def _counted(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count toward the target: created (not WAITING) and not interrupted."""
    import optuna

    return sum(t.state != optuna.trial.TrialState.WAITING and not t.user_attrs.get(INTERRUPTED) for t in trials)


def _tune_study(
    planned: PlannedStudy, spec: AblationSpec, storage: Any, url: str, store: Any, data_cache: Any,
    options: TuneOptions, events: TuneEvents,
) -> StudyOutcome:
    import optuna

    from harness.runner import environment_tags
    from harness.tracking.store import start_study_run
    from harness.train import resolve_device

    search = planned.search
    target = options.n_trials or search.n_trials
    objective = search.objective
    config = planned.run.config.model_copy(deep=True)
    if options.device:
        config.train.device = options.device  # type: ignore[assignment]
    config.profile.enabled = False
    device = resolve_device(config.train.device)

    with StorageLock(url):
        study = optuna.create_study(
            study_name=planned.name, storage=storage, direction=objective.goal, load_if_exists=True,
            sampler=_sampler(search, 0), pruner=_pruner(search, config.train.epochs),
        )
        attrs = study.user_attrs
        if study.direction.name.lower() != objective.goal or attrs.get(METRIC, objective.metric) != objective.metric:
            raise HarnessError(
                f"Optuna study {planned.name!r} in {mask_url(url)} optimises {attrs.get(METRIC, '?')} "
                f"({study.direction.name.lower()}), this file asks for {objective.metric} ({objective.goal}): "
                "rename the ablation or use another --storage"
            )
        for key, value in {METRIC: objective.metric, DIRECTION: objective.goal, ABLATION: spec.name,
                           VARIANT: planned.variant, GRID: json.dumps(planned.grid)}.items():
            if attrs.get(key) != value:
                study.set_user_attr(key, value)
        if search.enqueue and not attrs.get(ENQUEUED):
            for params in search.enqueue:
                study.enqueue_trial({k: int(v) if k == "batch_size" else v for k, v in params.items()})
            study.set_user_attr(ENQUEUED, True)
        _fail_stale_trials(study)
        counted = _counted(study.get_trials(deepcopy=False))

    events.study_started(planned, target, counted)
    results: list[TrialResult] = []
    parent_id = ""
    if counted < target:
        data = data_cache.get(config.data, events.data_progress)  # a bad data root stops here, before MLflow
        env = {k: v for k, v in environment_tags(device).items() if k not in ("harness.host", "harness.pid")}
        with StorageLock(url):  # one parent run per study, however many workers start together
            parent_id = start_study_run(store, planned.name, {
                **env, "harness.variant": planned.variant, "harness.grid": json.dumps(planned.grid),
                "harness.group": planned.run.group, "harness.seed": config.seed,
                "harness.metric": objective.metric, "harness.direction": objective.goal,
                "harness.n_trials": target, "harness.optuna_storage": mask_url(url),
                "harness.sampler": search.sampler.model_dump_json(), "harness.pruner": search.pruner.model_dump_json(),
                "harness.ablation_file": options.source_file,
            })
        context = _Context(planned, storage, url, store, parent_id, config, data, device, target, events,
                           threading.Event(), results)
        try:
            with _torch_threads(options.n_jobs, config):
                _run_workers(context, options.n_jobs)
        except (KeyboardInterrupt, _Interrupted):
            _finish_parent(context, "KILLED")
            raise
        except BaseException:
            _finish_parent(context, "FAILED")
            raise
        _finish_parent(context, None)

    study = optuna.load_study(study_name=planned.name, storage=storage)
    best = _best(study)
    every = study.get_trials(deepcopy=False)
    outcome = StudyOutcome(
        planned.name, planned.variant, objective.metric, objective.goal, target, len(results),
        _state_counts(every), _counted(every), best.number if best else None,
        best.value if best else None, dict(best.params) if best else {}, parent_id, results,
    )
    events.study_finished(outcome)
    return outcome


def _fail_stale_trials(study: optuna.Study) -> None:
    """RUNNING trials of a dead process on this host end FAIL (interrupted), so they stop counting."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = int(t.user_attrs.get(PID, 0) or 0)
        if t.user_attrs.get(HOST) != host or (pid and pid_alive(pid)):
            continue
        storage = study._storage  # a trial of another process: no public Trial handle for it
        storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
        storage.set_trial_user_attr(t._trial_id, FAILURE, "interrupted: its worker process died")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)


@contextlib.contextmanager
def _torch_threads(n_jobs: int, config: RunConfig) -> Iterator[None]:
    """K trials in threads share the cores: each gets cores / K intra-op threads (unless train.threads)."""
    import torch

    before = torch.get_num_threads()
    if n_jobs > 1 and not config.train.threads:
        torch.set_num_threads(max(1, before // n_jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_workers(context: _Context, n_jobs: int) -> None:
    if n_jobs == 1:
        _worker(context)
        return
    with ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="harness-tune") as pool:
        futures = [pool.submit(_worker, context) for _ in range(n_jobs)]
        try:
            while True:
                done, pending = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
                if not pending or any(f.exception() is not None for f in done):
                    break
        except KeyboardInterrupt:
            context.stop.set()
            wait(futures)
            raise
        context.stop.set()  # a worker raised: let the others end their trial quietly
        for future in futures:
            future.result()


def _worker(context: _Context) -> None:
    """Create and run trials until the study holds its target (counted under the storage lock)."""
    import optuna

    search = context.study.search
    distributions = _distributions(search)
    while not context.stop.is_set():
        with StorageLock(context.url):
            trials = _load(context).get_trials(deepcopy=False)
            if _counted(trials) >= context.target:
                return
            created = sum(t.state != optuna.trial.TrialState.WAITING for t in trials)
            # a Study object of its own per trial: its sampler is seeded by the trial's number
            study = optuna.study.Study(
                context.study.name, context.storage, sampler=_sampler(search, created),
                pruner=_pruner(search, context.config.train.epochs),
            )
            trial = study.ask(distributions)
            trial.set_user_attr(HOST, socket.gethostname())
            trial.set_user_attr(PID, os.getpid())
        _run_trial(context, study, trial)


def _apply_params(config: RunConfig, params: dict[str, Any]) -> RunConfig:
    config = config.model_copy(deep=True)
    for key, value in params.items():
        setattr(config.train, key, value)
    return config


def _run_trial(context: _Context, study: optuna.Study, trial: optuna.Trial) -> None:
    import optuna

    from harness.tracking.store import start_trial_run
    from harness.train import fit

    planned, objective = context.study, context.study.search.objective
    params = dict(trial.params)
    config = _apply_params(context.config, params)
    lr = float(params["lr"])
    try:
        child = start_trial_run(
            context.store, context.parent_id, f"{planned.name} #{trial.number}",
            {**params, **flatten(config.model_dump(mode="json"))},
            {
                "harness.study": planned.name, "harness.trial_number": trial.number,
                "harness.variant": planned.variant, "harness.group": planned.run.group, "harness.seed": config.seed,
                "harness.host": socket.gethostname(), "harness.pid": os.getpid(), "harness.trial_state": "RUNNING",
            },
        )
        trial.set_user_attr(RUN_ID, child.run_id)
    except BaseException as exc:  # the store failed, not the trial: end it uncounted, then stop
        trial.set_user_attr(INTERRUPTED, True)
        trial.set_user_attr(FAILURE, f"MLflow: {_one_line(exc)}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    context.events.trial_started(planned, trial.number, params)
    values: list[float] = []

    def on_epoch(epoch: int, record: dict[str, float]) -> None:
        child.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        value = float(record[objective.metric])
        values.append(value)
        if math.isfinite(value):
            trial.report(value, epoch)
        context.events.epoch(planned, trial.number, epoch, value)
        if context.stop.is_set():
            raise _Interrupted()
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def finish(state: str, value: float | None = None, reason: str = "") -> None:
        result = TrialResult(trial.number, state, params, value, len(values), reason, child.run_id)
        with context.guard:
            context.results.append(result)
        context.events.trial_finished(planned, result)

    try:
        result = fit(config, context.data, lr=lr, device=context.device, on_epoch=on_epoch)
    except optuna.TrialPruned:
        trial.set_user_attr(PRUNED_AT, len(values))
        frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        child.set_tags({"harness.trial_state": "PRUNED", "harness.pruned_at_epoch": len(values)})
        child.finish("KILLED")
        finish("PRUNED", frozen.value, f"pruned at epoch {len(values)}")
    except (KeyboardInterrupt, _Interrupted) as exc:
        reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "interrupted: the search stopped"
        trial.set_user_attr(INTERRUPTED, True)
        trial.set_user_attr(FAILURE, reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        child.set_tags({"harness.trial_state": "FAIL", "harness.failure": reason})
        child.finish("KILLED")
        raise
    except Exception as exc:  # a failing trial (NaN loss, out of memory, ...) must not stop the search
        _fail(study, trial, child, _one_line(exc), traceback.format_exc())
        finish("FAIL", reason=_one_line(exc))
    else:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            reason = f"{objective.metric} was never finite"
            _fail(study, trial, child, reason)
            finish("FAIL", reason=reason)
        else:
            value = max(finite) if objective.goal == "maximize" else min(finite)
            study.tell(trial, value)
            child.log_metrics({**result.summary, "objective": value, "lr_used": lr}, step=0)
            child.set_tags({"harness.trial_state": "COMPLETE"})
            child.finish("FINISHED")
            finish("COMPLETE", value)
            _tag_best(context, trial.number)


def _fail(study: optuna.Study, trial: optuna.Trial, child: Any, reason: str, details: str = "") -> None:
    import optuna

    trial.set_user_attr(FAILURE, reason)
    study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", reason)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    child.set_tags({"harness.trial_state": "FAIL"})
    if details:
        child.log_text(details, "traceback.txt")
    child.fail(reason)


def _tag_best(context: _Context, number: int) -> None:
    """After a completed trial: the study's best trial so far (all workers') as tags on its parent run,
    and the best value as the parent's metric `best_value` at step = the trial's number."""
    from harness.tracking.store import study_run

    with StorageLock(context.url):  # read and write together: a slower worker cannot put back an older best
        best = _best(_load(context))
        if best is None:
            return
        parent = study_run(context.store, context.parent_id)
        parent.set_tags({
            "harness.best_trial": best.number, "harness.best_value": repr(best.value),
            "harness.best_params": json.dumps(best.params),
            **{f"harness.best_{k}": repr(v) if isinstance(v, float) else v for k, v in best.params.items()},
        })
        parent.log_metrics({"best_value": best.value}, step=number)


def _load(context: _Context) -> optuna.Study:
    import optuna

    return optuna.load_study(study_name=context.study.name, storage=context.storage)


def _finish_parent(context: _Context, status: str | None) -> None:
    """Close the study's run: KILLED on Ctrl-C; else, once no worker holds a RUNNING trial, FINISHED if
    a trial completed and FAILED if none did."""
    from harness.tracking.store import study_run

    parent = study_run(context.store, context.parent_id)
    parent.set_tags({"harness.last_worker_end": dt.datetime.now().isoformat(timespec="seconds")})
    if status is None:
        counts = _state_counts(_load(context).get_trials(deepcopy=False))
        if counts["RUNNING"]:
            return  # another worker is still at it; it closes the run
        status = "FINISHED" if counts["COMPLETE"] else "FAILED"
    parent.finish(status)
