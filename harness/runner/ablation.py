"""Run an ablation: every planned run trained in turn, logged to MLflow, resumable, failures isolated.

For each run: skip it if a FINISHED child with the same config hash exists; otherwise execute it
(`harness.execution.run_one`: data from the decode-once cache, `harness.train.fit` with a checkpoint
and a profiler trace, results logged as docs/tracking.md lists). A run that raises is marked FAILED with
its reason and the grid goes on; Ctrl-C marks the current run KILLED and stops; a killed process leaves
a RUNNING run that the next start marks KILLED and resumes. Under torchrun, rank 0 leads and the other
ranks follow in step; with `executor: ray`, each run is a Ray task (`harness.runner.ray_executor`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import torch

from harness.checkpoints import checkpoint_path
from harness.data import DataCache, check_datasets
from harness.devices import resolve_device
from harness.distributed import DistContext, barrier, broadcast, init_from_env, shutdown
from harness.errors import HarnessError
from harness.execution import RunnerEvents, RunnerOptions, RunOutcome, execution_config, run_one
from harness.planning import AblationSpec, PlannedRun, resolve_lr
from harness.runner.ray_executor import run_on_ray
from harness.tracking import names
from harness.tracking.artifacts import log_comparison
from harness.tracking.environment import environment_tags, source_tags
from harness.tracking.store import AblationStore
from harness.tracking.uri import ensure_writable_dir
from harness.train import fit


def run_ablation(
    spec: AblationSpec,
    runs: list[PlannedRun],
    options: RunnerOptions,
    events: RunnerEvents | None = None,
) -> list[RunOutcome]:
    """Train every planned run not yet FINISHED in the store; return one outcome per planned run."""
    events = events or RunnerEvents()
    device = resolve_device(options.device or runs[0].config.train.device if runs else "cpu")
    context = init_from_env(device.type)
    if device.type == "cuda" and context.enabled:
        device = torch.device("cuda", context.local_rank)
    if context.is_main:
        outcomes = _lead(spec, runs, options, events, device, context)
    else:
        outcomes = _follow(spec.name, runs, device, options, context)
    shutdown(context)  # after a normal end only: after an error the ranks may never meet again
    return outcomes


def _lead(
    spec: AblationSpec, runs: list[PlannedRun], options: RunnerOptions, events: RunnerEvents, device: torch.device,
    context: DistContext,
) -> list[RunOutcome]:
    """Rank 0 (or the only process): plan, log to MLflow, train."""
    check_datasets((run.name, run.config.data) for run in runs)
    ensure_writable_dir(options.results_dir, "--results-dir")
    store = AblationStore(options.tracking_uri, spec.name, spec.description, spec.baseline_variant)
    stale = store.mark_stale_running()
    finished, busy = store.finished_hashes(), store.busy_hashes()
    outcomes: list[RunOutcome] = []
    pending = []
    for run in runs:
        if run.config_hash in finished:
            outcomes.append(RunOutcome(run, "skipped", "already FINISHED with this config hash"))
        elif run.config_hash in busy:
            outcomes.append(RunOutcome(run, "skipped", f"running in another process ({busy[run.config_hash]})"))
        else:
            pending.append(run)
    broadcast([r.config_hash for r in pending], context)
    events.plan(len(runs), len(pending), [o.run.name for o in outcomes], stale)
    if not pending:
        return outcomes

    env = {**environment_tags(device), **source_tags(f"harness run {options.source_file}".strip())}
    env[names.WORLD_SIZE] = str(context.world_size)
    parent_id = store.start_parent(
        f"{spec.name} {dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
        {**env, names.ABLATION_FILE: options.source_file, names.PLANNED_RUNS: len(pending)},
    )
    if options.executor == "ray":
        return outcomes + _run_on_ray(spec, pending, options, store, parent_id, events)
    data_cache = DataCache(options.results_dir)
    parent_status = "FINISHED"
    try:
        for index, run in enumerate(pending):
            outcome = run_one(run, index, store, parent_id, env, device, data_cache, options, events, context)
            outcomes.append(outcome)
            events.run_finished(outcome)
            if outcome.status == "failed":
                parent_status = "FAILED"
            if outcome.status != "finished" and context.enabled:  # the other ranks cannot skip ahead: stop
                store.finish_parent(parent_id, "FAILED")
                raise HarnessError(f"run {run.name} {outcome.status} under torchrun: {outcome.reason}; "
                                   "rerun to resume")
    except KeyboardInterrupt:
        store.finish_parent(parent_id, "KILLED")
        raise
    log_comparison(store, parent_id, [run.config_hash for run in runs])
    store.finish_parent(parent_id, parent_status)
    return outcomes


def _run_on_ray(
    spec: AblationSpec, pending: list[PlannedRun], options: RunnerOptions, store: AblationStore, parent_id: str,
    events: RunnerEvents,
) -> list[RunOutcome]:
    outcomes: list[RunOutcome] = []

    def on_done(run: PlannedRun, result: dict[str, Any]) -> None:
        outcome = RunOutcome(run, result["status"], result["reason"], result["summary"], result["run_id"])
        outcomes.append(outcome)
        events.run_finished(outcome)

    ablation = {"name": spec.name, "description": spec.description, "baseline": spec.baseline_variant}
    options = RunnerOptions(**{**options.__dict__, "tracking_uri": store.uri})
    try:
        run_on_ray(pending, ablation, options, parent_id, options.ray_address, on_done)
    except BaseException:
        store.finish_parent(parent_id, "KILLED")
        raise
    failed = any(o.status == "failed" for o in outcomes)
    log_comparison(store, parent_id, [run.config_hash for run in pending])
    store.finish_parent(parent_id, "FAILED" if failed else "FINISHED")
    return outcomes


def _follow(
    ablation: str, runs: list[PlannedRun], device: torch.device, options: RunnerOptions, context: DistContext
) -> list[RunOutcome]:
    """Ranks > 0 under torchrun: train the runs rank 0 chose, in step with it; log nothing."""
    pending_hashes = broadcast(None, context)
    by_hash = {r.config_hash: r for r in runs}
    data_cache = DataCache(options.results_dir)
    for config_hash in pending_hashes:
        run = by_hash[config_hash]
        config = execution_config(run, options)
        barrier(context)  # rank 0 has prepared (and cached) the data
        data = data_cache.get(config.data, lambda *_: None)
        fit(
            config, data, lr=resolve_lr(config), device=device,
            checkpoint_path=checkpoint_path(options.results_dir, ablation, run.config_hash), context=context,
        )
    return []
