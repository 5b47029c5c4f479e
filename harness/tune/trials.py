"""The workers of one study: each creates trials under the storage lock until the study holds its
target, trains them with `harness.train.fit`, reports every epoch to Optuna (a pruner may stop a trial)
and mirrors each trial's true end state into its MLflow run."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from harness.config import FloatRange, HyperbandPrunerSpec, MedianPrunerSpec, RunConfig, SearchSpec, flatten
from harness.data import PreparedData
from harness.errors import one_line
from harness.tracking import names
from harness.tracking.locks import StorageLock
from harness.tracking.optuna_storage import set_trial_attrs
from harness.tracking.store import AblationStore, ChildRun, pid_alive, start_trial_run, study_run
from harness.tracking.studies import best_trial, state_counts
from harness.train import fit
from harness.tune.planning import PlannedStudy
from harness.tune.results import TrialResult, TuneEvents

if TYPE_CHECKING:
    import optuna


class Interrupted(BaseException):
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


def sampler_for(search: SearchSpec, number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded with seed + the trial's number: reproducible with one worker, distinct across workers."""
    from optuna.samplers import TPESampler

    return TPESampler(seed=search.sampler.seed + number, n_startup_trials=search.sampler.n_startup_trials)


def pruner_for(search: SearchSpec, epochs: int) -> optuna.pruners.BasePruner:
    from optuna.pruners import HyperbandPruner, MedianPruner, NopPruner

    p = search.pruner
    if isinstance(p, MedianPrunerSpec):
        return MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                            interval_steps=p.interval_steps)
    if isinstance(p, HyperbandPrunerSpec):
        return HyperbandPruner(min_resource=p.min_resource, max_resource=p.max_resource or epochs,
                               reduction_factor=p.reduction_factor)
    return NopPruner()


@dataclass
class StudyContext:
    """What the workers of one study share."""

    study: PlannedStudy
    storage: Any
    url: str
    store: AblationStore
    parent_id: str
    config: RunConfig
    data: PreparedData
    device: torch.device
    target: int
    events: TuneEvents
    stop: threading.Event
    results: list[TrialResult] = field(default_factory=list)
    guard: threading.Lock = field(default_factory=threading.Lock)
    deadline: float | None = None  # time.monotonic() after which no new trial starts (harness tune --timeout)


def counted_trials(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count toward the target: created (not WAITING) and not interrupted."""
    import optuna

    waiting = optuna.trial.TrialState.WAITING
    return sum(t.state != waiting and not t.user_attrs.get(names.TRIAL_INTERRUPTED) for t in trials)


def fail_stale_trials(study: optuna.Study) -> None:
    """RUNNING trials of a dead process on this host end FAIL (interrupted), so they stop counting."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = int(t.user_attrs.get(names.TRIAL_PID, 0) or 0)
        if t.user_attrs.get(names.TRIAL_HOST) != host or (pid and pid_alive(pid)):
            continue
        set_trial_attrs(study, t, user={names.TRIAL_INTERRUPTED: True,
                                        names.TRIAL_FAILURE: "interrupted: its worker process died"})
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)


@contextlib.contextmanager
def torch_threads(n_jobs: int, config: RunConfig) -> Iterator[None]:
    """K trials in threads share the cores: each gets cores / K intra-op threads (unless train.threads)."""
    before = torch.get_num_threads()
    if n_jobs > 1 and not config.train.threads:
        torch.set_num_threads(max(1, before // n_jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_workers(context: StudyContext, n_jobs: int) -> None:
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


def _worker(context: StudyContext) -> None:
    """Create and run trials until the study holds its target (counted under the storage lock)."""
    import optuna

    search = context.study.search
    distributions = _distributions(search)
    while not context.stop.is_set():
        if context.deadline is not None and time.monotonic() >= context.deadline:
            return  # --timeout: trials already running finish, no new one starts
        with StorageLock(context.url):
            trials = load_study_of(context).get_trials(deepcopy=False)
            if counted_trials(trials) >= context.target:
                return
            created = sum(t.state != optuna.trial.TrialState.WAITING for t in trials)
            # a Study object of its own per trial: its sampler is seeded by the trial's number
            study = optuna.study.Study(
                context.study.name, context.storage, sampler=sampler_for(search, created),
                pruner=pruner_for(search, context.config.train.epochs),
            )
            trial = study.ask(distributions)
            trial.set_user_attr(names.TRIAL_HOST, socket.gethostname())
            trial.set_user_attr(names.TRIAL_PID, os.getpid())
        _run_trial(context, study, trial)


def _apply_params(config: RunConfig, params: dict[str, Any]) -> RunConfig:
    config = config.model_copy(deep=True)
    for key, value in params.items():
        setattr(config.train, key, value)
    return config


def _start_trial_run(
    context: StudyContext, study: optuna.Study, trial: optuna.Trial, config: RunConfig, params: dict[str, Any]
) -> ChildRun:
    """The trial's MLflow run; when the store fails, the trial ends FAIL uncounted and the error goes on."""
    import optuna

    planned = context.study
    try:
        child = start_trial_run(
            context.store, context.parent_id, f"{planned.name} #{trial.number}",
            {**params, **flatten(config.model_dump(mode="json"))},
            {
                names.STUDY: planned.name, names.TRIAL_NUMBER: trial.number, names.VARIANT: planned.variant,
                names.GROUP: planned.run.group, names.SEED: config.seed, names.HOST: socket.gethostname(),
                names.PID: os.getpid(), names.TRIAL_STATE: "RUNNING",
            },
        )
        trial.set_user_attr(names.TRIAL_RUN_ID, child.run_id)
    except BaseException as exc:
        trial.set_user_attr(names.TRIAL_INTERRUPTED, True)
        trial.set_user_attr(names.TRIAL_FAILURE, f"MLflow: {one_line(exc)}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    return child


def _run_trial(context: StudyContext, study: optuna.Study, trial: optuna.Trial) -> None:
    """Train one trial and end it in its true state: COMPLETE, PRUNED or FAIL (interrupted ones uncounted)."""
    import optuna

    planned, objective = context.study, context.study.search.objective
    params = dict(trial.params)
    config = _apply_params(context.config, params)
    lr = float(params["lr"])
    child = _start_trial_run(context, study, trial, config, params)
    context.events.trial_started(planned, trial.number, params)
    values: list[float] = []

    def on_epoch(epoch: int, record: dict[str, float]) -> None:
        child.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        value = float(record[names.logged_name(objective.metric)])
        values.append(value)
        if math.isfinite(value):
            trial.report(value, epoch)
        context.events.epoch(planned, trial.number, epoch, value)
        if context.stop.is_set():
            raise Interrupted()
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
        trial.set_user_attr(names.TRIAL_PRUNED_AT, len(values))
        frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        child.set_tags({names.TRIAL_STATE: "PRUNED", names.PRUNED_AT_EPOCH: len(values)})
        child.finish("KILLED")
        finish("PRUNED", frozen.value, f"pruned at epoch {len(values)}")
    except (KeyboardInterrupt, Interrupted) as exc:
        reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "interrupted: the search stopped"
        trial.set_user_attr(names.TRIAL_INTERRUPTED, True)
        trial.set_user_attr(names.TRIAL_FAILURE, reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        child.set_tags({names.TRIAL_STATE: "FAIL", names.FAILURE: reason})
        child.finish("KILLED")
        raise
    except Exception as exc:  # a failing trial (NaN loss, out of memory, ...) must not stop the search
        _fail(study, trial, child, one_line(exc), traceback.format_exc())
        finish("FAIL", reason=one_line(exc))
    else:
        _complete(context, study, trial, child, values, result.summary, lr, finish)


def _complete(
    context: StudyContext, study: optuna.Study, trial: optuna.Trial, child: ChildRun, values: list[float],
    summary: dict[str, float], lr: float, finish: Any,
) -> None:
    """A trial that trained to the end: COMPLETE with its best finite value, or FAIL if it had none."""
    objective = context.study.search.objective
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        reason = f"{objective.metric} was never finite"
        _fail(study, trial, child, reason)
        finish("FAIL", reason=reason)
        return
    value = max(finite) if objective.goal == "maximize" else min(finite)
    study.tell(trial, value)
    child.log_metrics({**summary, names.OBJECTIVE: value, names.LR_USED: lr}, step=0)
    child.set_tags({names.TRIAL_STATE: "COMPLETE"})
    child.finish("FINISHED")
    finish("COMPLETE", value)
    _tag_best(context, trial.number)


def _fail(study: optuna.Study, trial: optuna.Trial, child: ChildRun, reason: str, details: str = "") -> None:
    import optuna

    set_trial_attrs(study, trial, user={names.TRIAL_FAILURE: reason}, system={"fail_reason": reason})
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    child.set_tags({names.TRIAL_STATE: "FAIL"})
    if details:
        child.log_text(details, names.TRACEBACK_ARTIFACT)
    child.fail(reason)


def _tag_best(context: StudyContext, number: int) -> None:
    """After a completed trial: the study's best trial so far (all workers') as tags on its parent run,
    and the best value as the parent's metric `best_value` at step = the trial's number."""
    with StorageLock(context.url):  # read and write together: a slower worker cannot put back an older best
        best = best_trial(load_study_of(context))
        if best is None:
            return
        parent = study_run(context.store, context.parent_id)
        parent.set_tags({
            names.BEST_TRIAL: best.number, names.BEST_VALUE: repr(best.value),
            names.BEST_PARAMS: json.dumps(best.params),
            **{names.BEST_PARAM_PREFIX + k: repr(v) if isinstance(v, float) else v for k, v in best.params.items()},
        })
        parent.log_metrics({names.STUDY_BEST_VALUE: best.value}, step=number)


def load_study_of(context: StudyContext) -> optuna.Study:
    import optuna

    return optuna.load_study(study_name=context.study.name, storage=context.storage)


def finish_study_run(context: StudyContext, status: str | None) -> None:
    """Close the study's run: KILLED on Ctrl-C; else, once no worker holds a RUNNING trial, FINISHED if
    a trial completed and FAILED if none did."""
    parent = study_run(context.store, context.parent_id)
    parent.set_tags({names.LAST_WORKER_END: dt.datetime.now().isoformat(timespec="seconds")})
    if status is None:
        counts = state_counts(load_study_of(context).get_trials(deepcopy=False))
        if counts["RUNNING"]:
            return  # another worker is still at it; it closes the run
        status = "FINISHED" if counts["COMPLETE"] else "FAILED"
    parent.finish(status)
