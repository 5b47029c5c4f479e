"""One planned run, executed: its MLflow child run started (or reopened to resume), its data prepared,
`harness.train.fit` called with its checkpoint and profiler trace, its results logged, and a failure
recorded on the run instead of stopping the grid.

The local runner, torchrun ranks and Ray workers all execute runs through `run_one`; what they share
(options, outcomes, the events a caller draws) lives here too.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from harness import checkpoints, settings
from harness.analysis import post_training_analysis
from harness.checkpoints import checkpoint_path, saved_epoch
from harness.config import RunConfig, flatten
from harness.data import DataCache, PreparedData
from harness.distributed import DistContext, barrier
from harness.errors import HarnessError, TrackingUnreachable, one_line
from harness.planning import PlannedRun, resolve_lr
from harness.tracking import names
from harness.tracking.artifacts import (
    CheckpointUploads,
    fetch_checkpoint,
    has_checkpoint_artifact,
    log_data_inputs,
    log_run_artifacts,
)
from harness.tracking.store import AblationStore, ChildRun
from harness.tracking.system import system_metrics
from harness.train import DivergedError, FitResult, fit


class RunnerEvents:
    """What the runner reports while it works; these defaults ignore it (the CLI draws it with rich)."""

    def plan(self, total: int, to_run: int, skipped: list[str], stale: list[str]) -> None: ...
    def run_started(self, run: PlannedRun, index: int, resumed_from: int) -> None: ...
    def data_progress(self, phase: str, done: int, total: int) -> None: ...
    def step(self, step: int, steps: int) -> None: ...
    def epoch(self, run: PlannedRun, epoch: int, record: dict[str, float]) -> None: ...
    def run_finished(self, outcome: RunOutcome) -> None: ...


@dataclass
class RunOutcome:
    run: PlannedRun
    status: str  # finished | failed | skipped | killed
    reason: str = ""
    summary: dict[str, float] = field(default_factory=dict)
    run_id: str = ""


@dataclass
class RunnerOptions:
    tracking_uri: str | None = None
    device: str | None = None  # overrides train.device
    profile: bool = True
    results_dir: Path = Path("results")
    source_file: str = ""
    executor: str = "local"  # local | ray
    ray_address: str | None = None


def execution_config(run: PlannedRun, options: RunnerOptions) -> RunConfig:
    """The run's config with the invocation's execution-only overrides (device, profiling) applied."""
    config = run.config.model_copy(deep=True)
    if options.device:
        config.train.device = options.device  # type: ignore[assignment]
    if not options.profile:
        config.profile.enabled = False
    return config


def trace_dir(results_dir: Path, run: PlannedRun) -> Path:
    """Where the run's profiler trace goes: results/profiles/<run name>-<config hash>."""
    name = f"{run.name}-{run.config_hash}"
    return results_dir / "profiles" / "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def run_tags(run: PlannedRun, config: RunConfig, env: dict[str, str], trace: Path) -> dict[str, str]:
    tags = {
        **env,
        names.VARIANT: run.variant,
        names.GROUP: run.group,
        names.GRID: json.dumps(run.grid),
        names.SEED: str(config.seed),
        names.CONFIG_HASH: run.config_hash,
        names.BASELINE: str(run.baseline).lower(),
        names.TRACE_DIR: str(trace),
    }
    if run.lr_study:
        tags[names.LR_FROM_STUDY] = run.lr_study
    if config.model.backend == "torchvision":  # the ablation compares against torchvision's op
        tags[names.DCN_KERNEL] = "torchvision.ops.deform_conv2d"
    return tags


def _open_child(
    run: PlannedRun, config: RunConfig, store: AblationStore, parent_id: str, tags: dict[str, str], checkpoint: Path
) -> tuple[ChildRun, bool] | str:
    """The run's MLflow record, owned by this process: the interrupted one reopened when its checkpoint is
    there, else a new one. Or why not: another process finished it, trains it, or took it just now."""
    with store.exclusive():  # look and take in one step: two processes never both find the config free
        opened = _take_child(run, config, store, parent_id, tags, checkpoint)
    if isinstance(opened, str):
        return opened
    child, resumed = opened
    if resumed and not checkpoints.exists(checkpoint):
        fetch_checkpoint(child, checkpoint, store.uri)  # another machine trained it: resume from its artifact
    if not resumed:
        child.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), names.CONFIG_ARTIFACT)
    return child, resumed


def _take_child(
    run: PlannedRun, config: RunConfig, store: AblationStore, parent_id: str, tags: dict[str, str], checkpoint: Path
) -> tuple[ChildRun, bool] | str:
    if run.config_hash in store.finished_hashes():
        return "already FINISHED with this config hash (by another process)"
    owner = store.busy_hashes().get(run.config_hash)
    if owner is not None:
        return f"running in another process ({owner.rsplit(' ', 1)[0] if owner.count(' ') == 2 else owner})"
    previous = store.child_by_hash(run.config_hash)
    local = checkpoints.exists(checkpoint)
    if previous is not None and not local and not has_checkpoint_artifact(ChildRun(store.client, previous.info.run_id)):
        previous = None  # no checkpoint here nor among its artifacts: start again in a new run
    if previous is not None:
        if not store.claim(previous.info.run_id):
            return "another process took it to resume at the same moment"
        return store.reopen_child(previous.info.run_id, {**tags, names.RESUMED_BY: parent_id}), True
    child = store.start_child(parent_id, run.name, flatten(config.model_dump(mode="json")), tags)
    if not store.first_claim(child, run.config_hash):
        return "another process started it at the same moment"
    checkpoints.remove(checkpoint)  # a checkpoint without its run cannot be resumed honestly
    return child, False


def run_one(
    run: PlannedRun, index: int, store: AblationStore, parent_id: str, env: dict[str, str],
    device: torch.device, data_cache: DataCache, options: RunnerOptions, events: RunnerEvents,
    context: DistContext,
) -> RunOutcome:
    """Train one planned run into its MLflow child run; a failure ends that run FAILED and is returned."""
    config = execution_config(run, options)
    checkpoint = checkpoint_path(options.results_dir, store.ablation, run.config_hash)
    trace = trace_dir(options.results_dir, run)
    opened = _open_child(run, config, store, parent_id, run_tags(run, config, env, trace), checkpoint)
    if isinstance(opened, str):
        return RunOutcome(run, "skipped", opened)
    child, resumed = opened
    try:
        data = data_cache.get(config.data, events.data_progress)
        barrier(context)  # the other ranks read the data from the cache now
        log_data_inputs(child, config.data, data)
        lr = resolve_lr(config)
        logged = child.logged_steps(names.VAL_MAP) if resumed else set()
        events.run_started(run, index, saved_epoch(checkpoint))
        uploads = CheckpointUploads(child, checkpoint, config.train.log_checkpoint,
                                    settings.current().checkpoint_upload_every)

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            uploads.after_epoch(epoch)
            if epoch not in logged:  # an attempt before this one logged it already
                child.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            logged.add(epoch)
            events.epoch(run, epoch, record)

        with child.keep_alive(), system_metrics(child, config.train.system_metrics and context.is_main):
            result = fit(
                config, data, lr=lr, device=device, checkpoint_path=checkpoint, trace_dir=trace,
                on_epoch=on_epoch, on_step=events.step, context=context,
            )
        # epochs trained before an interruption whose metrics never reached the store
        for record in result.history:
            epoch = int(record["epoch"])
            if epoch not in logged:
                child.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        log_result(child, result, data, lr)
        log_run_artifacts(child, trace if config.profile.enabled else None, checkpoint,
                          uploads.final_mode(config.train.epochs))
        post_training_analysis(child, config, data, checkpoint, device, run.name, run.group, context.enabled)
    except KeyboardInterrupt:
        child.set_tags({names.FAILURE: "interrupted (Ctrl-C); rerun to resume from the last epoch"})
        child.finish("KILLED")
        raise
    except TrackingUnreachable:  # nothing can be written: the run stays RUNNING and the next command resumes it
        raise
    except (HarnessError, DivergedError) as exc:  # the run's own failure, said in one line: no traceback
        child.fail(str(exc))
        return RunOutcome(run, "failed", str(exc), run_id=child.run_id)
    except Exception as exc:  # a failing run must not stop the grid
        reason = one_line(exc)
        child.fail(reason)
        child.log_text(traceback.format_exc(), names.TRACEBACK_ARTIFACT)
        return RunOutcome(run, "failed", reason, run_id=child.run_id)
    child.finish()
    return RunOutcome(run, "finished", summary=result.summary, run_id=child.run_id)


def log_result(child: ChildRun, result: FitResult, data: PreparedData, lr: float) -> None:
    """A run's summary metrics (step 0, held-out ones included), its model summary, per-class AP and op
    table, and where it resumed from."""
    summary = dict(result.summary)
    summary[names.LR_USED] = lr
    summary[names.TRAIN_IMAGES] = float(data.train_images.shape[0])
    summary[names.VAL_IMAGES] = float(data.val_images.shape[0])
    summary[names.SKIPPED_IMAGES] = float(data.skipped)
    if data.test_images is not None:
        summary[names.TEST_IMAGES] = float(data.test_images.shape[0])
    if data.ood_images is not None:
        summary[names.OOD_IMAGES] = float(data.ood_images.shape[0])
    child.log_metrics(summary, step=0)
    child.log_text(result.model_summary, names.MODEL_SUMMARY_ARTIFACT)
    if result.per_class_ap is not None:
        child.log_text(json.dumps(result.per_class_ap), names.PER_CLASS_AP_ARTIFACT)
    if result.profile is not None:
        child.log_text(result.profile.op_table_csv(), names.OP_TABLE_ARTIFACT)
    if result.resumed_from:
        child.set_tags({names.RESUMED_FROM_EPOCH: result.resumed_from})
