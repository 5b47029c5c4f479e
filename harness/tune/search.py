"""`tune`: run each planned study until it holds its target number of trials, whoever runs them."""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

from harness.config import RunConfig
from harness.data import DataCache, check_datasets
from harness.devices import resolve_device
from harness.errors import HarnessError
from harness.planning import AblationSpec
from harness.tracking import names
from harness.tracking.environment import environment_tags, source_tags
from harness.tracking.locks import StorageLock
from harness.tracking.optuna_storage import open_storage, resolve_storage
from harness.tracking.store import AblationStore, start_study_run
from harness.tracking.studies import best_trial, state_counts
from harness.tracking.uri import ensure_writable_dir, mask_url
from harness.tune.planning import PlannedStudy
from harness.tune.results import StudyOutcome, TrialResult, TuneEvents, TuneOptions
from harness.tune.trials import (
    Interrupted,
    StudyContext,
    counted_trials,
    fail_stale_trials,
    finish_study_run,
    pruner_for,
    run_workers,
    sampler_for,
    torch_threads,
)

if TYPE_CHECKING:
    import optuna


def tune(
    spec: AblationSpec, studies: list[PlannedStudy], options: TuneOptions, events: TuneEvents | None = None
) -> list[StudyOutcome]:
    """Run each study until it holds its target number of trials; return one outcome per study.

    The target is `options.n_trials` or `search.n_trials` and counts every trial the study already has
    (COMPLETE, PRUNED, FAIL, or RUNNING in a live worker), whoever ran it: a rerun after completion runs
    nothing, an interrupted search runs only what is missing. Trials interrupted by Ctrl-C or by a killed
    worker end FAIL (tag `harness.interrupted`) and do not count.
    """
    events = events or TuneEvents()
    if options.n_trials is not None and options.n_trials < 1:
        raise HarnessError(f"--n-trials {options.n_trials}: give at least 1")
    if options.n_jobs < 1:
        raise HarnessError(f"--n-jobs {options.n_jobs}: give at least 1")
    if options.timeout is not None and not options.timeout > 0:
        raise HarnessError(f"--timeout {options.timeout:g}: give a positive number of seconds")
    check_datasets((study.name, study.run.config.data) for study in studies)
    ensure_writable_dir(options.results_dir, "--results-dir")
    url = resolve_storage(options.storage)
    storage = open_storage(url, create=True)
    with StorageLock(url):  # workers started together must not race to create the MLflow tables and experiment
        store = AblationStore(options.tracking_uri, spec.name, spec.description, spec.baseline_variant)
    store.mark_stale_running()
    data_cache = DataCache(options.results_dir)
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    return [_tune_study(study, spec, storage, url, store, data_cache, options, events, deadline)
            for study in studies]


def _open_study(planned: PlannedStudy, spec: AblationSpec, storage: Any, url: str, epochs: int) -> optuna.Study:
    """Create or load the study (under the storage lock); refuse one that optimises something else."""
    import optuna

    search, objective = planned.search, planned.search.objective
    study = optuna.create_study(
        study_name=planned.name, storage=storage, direction=objective.goal, load_if_exists=True,
        sampler=sampler_for(search, 0), pruner=pruner_for(search, epochs),
    )
    attrs = study.user_attrs
    metric = attrs.get(names.STUDY_METRIC, objective.metric)
    if study.direction.name.lower() != objective.goal or metric != objective.metric:
        raise HarnessError(
            f"Optuna study {planned.name!r} in {mask_url(url)} optimises {attrs.get(names.STUDY_METRIC, '?')} "
            f"({study.direction.name.lower()}), this file asks for {objective.metric} ({objective.goal}): "
            "rename the ablation or use another --storage"
        )
    wanted = {names.STUDY_METRIC: objective.metric, names.STUDY_DIRECTION: objective.goal,
              names.STUDY_ABLATION: spec.name, names.STUDY_VARIANT: planned.variant,
              names.STUDY_GRID: json.dumps(planned.grid)}
    for key, value in wanted.items():
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    if study.metric_names != [objective.metric]:  # optuna-dashboard and optuna.visualization label the axis
        study.set_metric_names([objective.metric])
    if search.enqueue and not attrs.get(names.STUDY_ENQUEUED):
        for params in search.enqueue:
            study.enqueue_trial({k: int(v) if k == "batch_size" else v for k, v in params.items()})
        study.set_user_attr(names.STUDY_ENQUEUED, True)
    fail_stale_trials(study)
    return study


def _study_run_tags(planned: PlannedStudy, config: RunConfig, device: Any, url: str, target: int,
                    source_file: str) -> dict[str, Any]:
    search, objective = planned.search, planned.search.objective
    return {
        **environment_tags(device, with_process=False), **source_tags(f"harness tune {source_file}".strip()),
        names.VARIANT: planned.variant,
        names.GRID: json.dumps(planned.grid), names.GROUP: planned.run.group, names.SEED: config.seed,
        names.METRIC: objective.metric, names.DIRECTION: objective.goal, names.N_TRIALS: target,
        names.OPTUNA_STORAGE: mask_url(url), names.SAMPLER: search.sampler.model_dump_json(),
        names.PRUNER: search.pruner.model_dump_json(), names.ABLATION_FILE: source_file,
    }


def _tune_study(
    planned: PlannedStudy, spec: AblationSpec, storage: Any, url: str, store: AblationStore, data_cache: DataCache,
    options: TuneOptions, events: TuneEvents, deadline: float | None = None,
) -> StudyOutcome:
    import optuna

    objective = planned.search.objective
    target = options.n_trials or planned.search.n_trials
    config = planned.run.config.model_copy(deep=True)
    if options.device:
        config.train.device = options.device  # type: ignore[assignment]
    config.profile.enabled = False
    device = resolve_device(config.train.device)
    with StorageLock(url):
        study = _open_study(planned, spec, storage, url, config.train.epochs)
        counted = counted_trials(study.get_trials(deepcopy=False))

    events.study_started(planned, target, counted)
    results: list[TrialResult] = []
    parent_id = ""
    if counted < target and (deadline is None or time.monotonic() < deadline):
        data = data_cache.get(config.data, events.data_progress)  # a bad data root stops here, before MLflow
        with StorageLock(url):  # one parent run per study, however many workers start together
            tags = _study_run_tags(planned, config, device, url, target, options.source_file)
            parent_id = start_study_run(store, planned.name, tags)
        context = StudyContext(planned, storage, url, store, parent_id, config, data, device, target, events,
                               threading.Event(), results, deadline=deadline)
        try:
            with torch_threads(options.n_jobs, config):
                run_workers(context, options.n_jobs)
        except (KeyboardInterrupt, Interrupted):
            finish_study_run(context, "KILLED")
            raise
        except BaseException:
            finish_study_run(context, "FAILED")
            raise
        finish_study_run(context, None)

    study = optuna.load_study(study_name=planned.name, storage=storage)
    best = best_trial(study)
    every = study.get_trials(deepcopy=False)
    outcome = StudyOutcome(
        planned.name, planned.variant, objective.metric, objective.goal, target, len(results),
        state_counts(every), counted_trials(every), best.number if best else None,
        best.value if best else None, dict(best.params) if best else {}, parent_id, results,
    )
    events.study_finished(outcome)
    return outcome
