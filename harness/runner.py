"""Run an ablation: every planned run trained in turn, logged to MLflow, resumable, failures isolated.

For each run: skip it if a FINISHED child with the same config hash exists; otherwise prepare the
data (decode-once cache), call `harness.train.fit` with a checkpoint under results/checkpoints/<hash>
and a profiler trace under results/profiles/<run>, and log what docs/tracking.md lists. A run that
raises is marked FAILED with its reason and the grid goes on; Ctrl-C marks the current run KILLED and
stops; a killed process leaves a RUNNING run that the next start marks KILLED and resumes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from harness import __version__
from harness.data import PreparedData, prepare_data, synthesize
from harness.distributed import DistContext, barrier, broadcast, init_from_env, shutdown
from harness.errors import HarnessError
from harness.ops import kernel_summary
from harness.spec import AblationSpec, DataConfig, PlannedRun, RunConfig, flatten
from harness.tracking.store import AblationStore, ChildRun
from harness.train import FitResult, fit, resolve_device


class RunnerEvents:
    """What the runner reports while it works; these defaults ignore it (the CLI draws it with rich)."""

    def plan(self, total: int, to_run: int, skipped: list[str], stale: list[str]) -> None: ...
    def run_started(self, run: PlannedRun, index: int, resumed_from: int) -> None: ...
    def data_progress(self, phase: str, done: int, total: int) -> None: ...
    def step(self, step: int, steps: int) -> None: ...
    def epoch(self, run: PlannedRun, epoch: int, record: dict[str, float]) -> None: ...
    def run_finished(self, outcome: RunOutcome) -> None: ...


SilentEvents = RunnerEvents


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


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def environment_tags(device: torch.device) -> dict[str, str]:
    name = str(device)
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "harness.git_commit": git_commit(),
        "harness.device": name,
        "harness.dcn_kernel": kernel_summary(device),
        "harness.host": socket.gethostname(),
        "harness.pid": str(os.getpid()),
        "harness.torch": torch.__version__,
        "harness.cuda": torch.version.cuda or "none",
        "harness.version": __version__,
        "harness.python": platform.python_version(),
        "harness.packages": _package_versions(),
    }


def _package_versions() -> str:
    """The versions a result depends on, e.g. 'torchvision 0.29.1, mlflow 3.17.2, ...'."""
    from importlib import metadata

    found = []
    for name in ("torchvision", "numpy", "pillow", "pycocotools", "mlflow", "optuna"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _data_root(config: DataConfig, results_dir: Path, progress: Callable[[str, int, int], None]) -> Path:
    """The COCO root a run reads: the configured one, or the generated synthetic task (made once)."""
    if config.source == "synthetic":
        synth = config.synthetic
        root = results_dir / "data" / f"synthetic-{synth.n_train}-{synth.n_val}-{config.image_size}-{synth.seed}"
        if not (root / "annotations" / "instances_val2017.json").exists():
            progress("generating synthetic task", 0, 1)
            synthesize(root, n_train=synth.n_train, n_val=synth.n_val, size=config.image_size, seed=synth.seed)
        return root
    if not config.root:
        raise HarnessError(
            "no COCO root: pass --data-root DIR, set data.root in the ablation file, or set $HARNESS_COCO_ROOT"
        )
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise HarnessError(f"data root not found: {root}")
    return root


def check_data_roots(runs: list[PlannedRun]) -> None:
    """Before anything is logged: every COCO root the runs read exists with its annotation files."""
    from harness.data import annotation_path

    seen: set[tuple[str | None, str, str]] = set()
    for run in runs:
        data = run.config.data
        key = (data.root, data.train_split, data.val_split)
        if data.source != "coco" or key in seen:
            continue
        seen.add(key)
        if not data.root:
            raise HarnessError(
                f"run {run.name}: no COCO root: pass --data-root DIR, set data.root, or set $HARNESS_COCO_ROOT"
            )
        root = Path(data.root).expanduser()
        if not root.is_dir():
            raise HarnessError(f"data root not found: {root}")
        for split in dict.fromkeys((data.train_split, data.val_split)):
            if not annotation_path(root, split).is_file():
                raise HarnessError(f"annotation file not found: {annotation_path(root, split)}")


class DataCache:
    """Prepared data shared by the runs of one invocation that read the same subset."""

    def __init__(self, results_dir: Path) -> None:
        self.results_dir = results_dir
        self._entries: dict[str, PreparedData] = {}

    def get(self, config: DataConfig, progress: Callable[[str, int, int], None]) -> PreparedData:
        root = _data_root(config, self.results_dir, progress)
        key = repr((str(root.resolve()), config.model_dump(exclude={"hflip", "random_resized_crop"})))
        if key not in self._entries:
            self._entries[key] = prepare_data(
                root, train_split=config.train_split, val_split=config.val_split,
                train_size=config.train_size, val_size=config.val_size, image_size=config.image_size,
                resize=config.resize, subset_seed=config.subset_seed, cache_dir=self.results_dir / "cache",
                drop_empty=config.drop_empty, include_crowd=config.include_crowd,
                strict_images=config.strict_images, progress=progress,
            )
        return self._entries[key]


def resolve_lr(config: RunConfig) -> float:
    """A number, or the best rate of an Optuna study (`lr: {from_study: NAME}`)."""
    lr = config.train.lr
    if isinstance(lr, float | int):
        return float(lr)
    from harness.tune import best_lr_from_study

    return best_lr_from_study(lr.from_study)


def _safe_dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def run_ablation(
    spec: AblationSpec,
    runs: list[PlannedRun],
    options: RunnerOptions,
    events: RunnerEvents | None = None,
) -> list[RunOutcome]:
    """Train every planned run not yet FINISHED in the store; return one outcome per planned run."""
    events = events or SilentEvents()
    device = resolve_device(options.device or runs[0].config.train.device if runs else "cpu")
    context = init_from_env(device.type)
    if device.type == "cuda" and context.enabled:
        device = torch.device("cuda", context.local_rank)
    if context.is_main:
        outcomes = _lead(spec, runs, options, events, device, context)
    else:
        outcomes = _follow(runs, device, options, context)
    shutdown(context)  # after a normal end only: after an error the ranks may never meet again
    return outcomes


def _lead(
    spec: AblationSpec, runs: list[PlannedRun], options: RunnerOptions, events: RunnerEvents, device: torch.device,
    context: DistContext,
) -> list[RunOutcome]:
    """Rank 0 (or the only process): plan, log to MLflow, train."""
    check_data_roots(runs)
    store = AblationStore(options.tracking_uri, spec.name, spec.description, spec.baseline_variant)
    stale = store.mark_stale_running()
    finished = store.finished_hashes()
    outcomes: list[RunOutcome] = []
    pending = []
    for run in runs:
        if run.config_hash in finished:
            outcomes.append(RunOutcome(run, "skipped", "already FINISHED with this config hash"))
        else:
            pending.append(run)
    broadcast([r.config_hash for r in pending], context)
    events.plan(len(runs), len(pending), [o.run.name for o in outcomes], stale)
    if not pending:
        return outcomes

    env = environment_tags(device)
    env["harness.world_size"] = str(context.world_size)
    parent_id = store.start_parent(
        f"{spec.name} {dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
        {**env, "harness.ablation_file": options.source_file, "harness.planned_runs": len(pending)},
    )
    if options.executor == "ray":
        return outcomes + _run_on_ray(spec, pending, options, store, parent_id, events)
    data_cache = DataCache(options.results_dir)
    parent_status = "FINISHED"
    try:
        for index, run in enumerate(pending):
            outcome = _run_one(run, index, store, parent_id, env, device, data_cache, options, events, context)
            outcomes.append(outcome)
            events.run_finished(outcome)
            if outcome.status != "finished":
                parent_status = "FAILED"
                if context.enabled:  # the other ranks cannot skip ahead in step: stop the job
                    store.finish_parent(parent_id, parent_status)
                    raise HarnessError(f"run {run.name} failed under torchrun: {outcome.reason}; rerun to resume")
    except KeyboardInterrupt:
        store.finish_parent(parent_id, "KILLED")
        raise
    store.finish_parent(parent_id, parent_status)
    return outcomes


def _run_on_ray(
    spec: AblationSpec, pending: list[PlannedRun], options: RunnerOptions, store: AblationStore, parent_id: str,
    events: RunnerEvents,
) -> list[RunOutcome]:
    from harness.ray_executor import run_on_ray

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
    store.finish_parent(parent_id, "FAILED" if failed else "FINISHED")
    return outcomes


def _follow(
    runs: list[PlannedRun], device: torch.device, options: RunnerOptions, context: DistContext
) -> list[RunOutcome]:
    """Ranks > 0 under torchrun: train the runs rank 0 chose, in step with it; log nothing."""
    pending_hashes = broadcast(None, context)
    by_hash = {r.config_hash: r for r in runs}
    data_cache = DataCache(options.results_dir)
    for config_hash in pending_hashes:
        run = by_hash[config_hash]
        config = _execution_config(run, options)
        barrier(context)  # rank 0 has prepared (and cached) the data
        data = data_cache.get(config.data, lambda *_: None)
        fit(
            config, data, lr=resolve_lr(config), device=device,
            checkpoint_path=options.results_dir / "checkpoints" / run.config_hash / "last.pt", context=context,
        )
    return []


def _execution_config(run: PlannedRun, options: RunnerOptions) -> RunConfig:
    config = run.config.model_copy(deep=True)
    if options.device:
        config.train.device = options.device  # type: ignore[assignment]
    if not options.profile:
        config.profile.enabled = False
    return config


def _run_one(
    run: PlannedRun, index: int, store: AblationStore, parent_id: str, env: dict[str, str],
    device: torch.device, data_cache: DataCache, options: RunnerOptions, events: RunnerEvents,
    context: DistContext,
) -> RunOutcome:
    config = _execution_config(run, options)
    checkpoint = options.results_dir / "checkpoints" / run.config_hash / "last.pt"
    trace_dir = options.results_dir / "profiles" / _safe_dirname(f"{run.name}-{run.config_hash}")
    tags = {
        **env,
        "harness.variant": run.variant,
        "harness.group": run.group,
        "harness.grid": json.dumps(run.grid),
        "harness.seed": config.seed,
        "harness.config_hash": run.config_hash,
        "harness.baseline": str(run.baseline).lower(),
        "harness.trace_dir": str(trace_dir),
    }
    if config.model.backend == "torchvision":  # the ablation compares against torchvision's op
        tags["harness.dcn_kernel"] = "torchvision.ops.deform_conv2d"
    previous = store.child_by_hash(run.config_hash) if checkpoint.exists() else None
    if previous is not None:
        child = store.reopen_child(previous.info.run_id, {**tags, "harness.resumed_by": parent_id})
    else:
        checkpoint.unlink(missing_ok=True)  # a checkpoint without its run cannot be resumed honestly
        child = store.start_child(parent_id, run.name, flatten(config.model_dump(mode="json")), tags)
        child.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")

    try:
        data = data_cache.get(config.data, events.data_progress)
        barrier(context)  # the other ranks read the data from the cache now
        lr = resolve_lr(config)
        logged = child.logged_steps("val_map") if previous is not None else set()
        resumed_from = _resumed_epoch(checkpoint)
        events.run_started(run, index, resumed_from)

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            child.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            logged.add(epoch)
            events.epoch(run, epoch, record)

        result = fit(
            config, data, lr=lr, device=device, checkpoint_path=checkpoint, trace_dir=trace_dir,
            on_epoch=on_epoch, on_step=events.step, context=context,
        )
        # epochs trained before an interruption whose metrics never reached the store
        for record in result.history:
            epoch = int(record["epoch"])
            if epoch not in logged:
                child.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        _log_result(child, result, data, lr)
        from harness.analysis import post_training_analysis  # no-op unless analysis is asked for

        post_training_analysis(child, config, data, checkpoint, device, run, context.enabled)
    except KeyboardInterrupt:
        child.set_tags({"harness.failure": "interrupted (Ctrl-C); rerun to resume from the last epoch"})
        child.finish("KILLED")
        raise
    except HarnessError as exc:
        child.fail(str(exc))
        return RunOutcome(run, "failed", str(exc), run_id=child.run_id)
    except Exception as exc:  # a failing run must not stop the grid
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        child.fail(reason)
        child.log_text(traceback.format_exc(), "traceback.txt")
        return RunOutcome(run, "failed", reason, run_id=child.run_id)
    child.finish()
    return RunOutcome(run, "finished", summary=result.summary, run_id=child.run_id)


def _resumed_epoch(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"])
    except Exception:  # a corrupt checkpoint is reported by fit
        return 0


def _log_result(child: ChildRun, result: FitResult, data: PreparedData, lr: float) -> None:
    summary = dict(result.summary)
    summary["lr_used"] = lr
    summary["train_images"] = float(data.train_images.shape[0])
    summary["val_images"] = float(data.val_images.shape[0])
    summary["skipped_images"] = float(data.skipped)
    child.log_metrics(summary, step=0)
    child.log_text(result.model_summary, "model_summary.txt")
    if result.profile is not None:
        child.log_text(result.profile.op_table_csv(), "profile/op_table.csv")
    child.set_tags({"harness.resumed_from_epoch": result.resumed_from} if result.resumed_from else {})
