"""`harness run` and `harness list`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.cli.app import DataRootOption, DeviceOption, TrackingUriOption, app, console, err_console
from harness.config import RunConfig, flatten
from harness.data import SHAPES
from harness.distributed import launched_by_torchrun
from harness.errors import HarnessError
from harness.models import MODELS, build_network, deformable_names, measure_cost, pretrained_file
from harness.planning import MAX_RUNS, PlannedRun, expand, load_ablation, parse_set, select, shard
from harness.runner import RunnerEvents, RunnerOptions, RunOutcome, run_ablation
from harness.tracking import names as tracking_names

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config key for every run: key.path=value (repeatable); "
                 "grid.<axis>=[..] replaces a grid axis"),
]
OnlyOption = Annotated[
    list[str] | None, typer.Option("--only", help="glob over variant or run names (repeatable)")
]
MaxRunsOption = Annotated[
    int | None, typer.Option("--max-runs", help=f"allow a grid of more than {MAX_RUNS} runs (up to this many)")
]
OverrideVariantsOption = Annotated[
    bool, typer.Option("--override-variants", help="let --set replace keys that variants set themselves")
]


def _plan(file: Path, set_items: list[str] | None, data_root: Path | None, only: list[str] | None,
          shard_spec: str | None = None, max_runs: int | None = None, override_variants: bool = False):
    spec = load_ablation(file)
    runs = expand(spec, parse_set(set_items), data_root, source=str(file), max_runs=max_runs,
                  override_variants=override_variants)
    for pretrained in sorted({r.config.model.pretrained for r in runs if r.config.model.pretrained}):
        pretrained_file(pretrained)  # a missing weights file stops the plan, not a run
    return spec, shard(select(runs, only), shard_spec)


@app.command("list")
def list_runs(
    file: Annotated[Path, typer.Argument(help="ablation YAML file")],
    set_items: SetOption = None,
    data_root: DataRootOption = None,
    only: OnlyOption = None,
    max_runs: MaxRunsOption = None,
    override_variants: OverrideVariantsOption = False,
) -> None:
    """Print the runs an ablation file expands to: name, overrides, config hash."""
    spec, runs = _plan(file, set_items, data_root, only, None, max_runs, override_variants)
    table = Table(title=f"{spec.name}: {len(runs)} runs (baseline: {spec.baseline_variant})")
    for col in ("#", "run", "variant overrides", "hash"):
        table.add_column(col)
    for i, run in enumerate(runs):
        override = spec.variants.get(run.variant) or {}
        table.add_row(str(i), run.name, _inline(override), run.config_hash)
    console.print(table)
    console.print(network_table(runs))


def _num_classes(config: RunConfig) -> int:
    return len(SHAPES) if config.data.source == "synthetic" else 80


def _compact(names: list[str], limit: int = 4) -> str:
    """A few names in full; more grouped by their first component ("layer3×4")."""
    if len(names) <= limit:
        return ", ".join(names)
    groups: dict[str, int] = {}
    for name in names:
        head = name.split(".", 1)[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{head}×{count}" for head, count in groups.items())


def network_table(runs: list[PlannedRun]) -> Table:
    """Per distinct network of the plan: its deformable layers, parameters and forward FLOPs per image."""
    table = Table(title="networks (FLOPs per image at data.image_size; bilinear sampling not counted)")
    for col, justify in (("variant", "left"), ("arch", "left"), ("deformable conv layers", "left"),
                         ("params", "right"), ("GFLOPs", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    seen: set[str] = set()
    for run in runs:
        config = run.config
        key = f"{config.model.model_dump_json()}|{config.data.image_size}|{_num_classes(config)}"
        if key in seen:
            continue
        seen.add(key)
        model = build_network(config.model, _num_classes(config), load_pretrained_weights=False)
        cost = measure_cost(model, config.data.image_size)
        names = ([f"conv{i}" for i in model.deform_indices] if config.model.arch in MODELS
                 else deformable_names(model))
        placed = f"{len(names)}: {_compact(names)}" if names else "none"
        label = run.variant + "".join(f" {k}={v}" for k, v in run.grid.items() if k != "seed")
        table.add_row(label, config.model.arch, placed, f"{cost.params:,}", f"{cost.flops_per_image / 1e9:.3f}")
    return table


def _inline(data: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in flatten(data).items()) or "—"


class RichEvents(RunnerEvents):
    """Live progress: runs done/total, the current run's epochs, and its steps with ETA."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.runs_task = progress.add_task("runs", total=None)
        self.epoch_task = progress.add_task("epochs", total=None, visible=False)
        self.step_task = progress.add_task("steps", total=None, visible=False)
        self.data_task = progress.add_task("data", total=None, visible=False)
        self.current: PlannedRun | None = None

    def plan(self, total: int, to_run: int, skipped: list[str], stale: list[str]) -> None:
        for name in stale:
            self.progress.console.print(f"[yellow]marked stale RUNNING run {name} as KILLED[/]")
        if skipped:
            self.progress.console.print(f"skipping {len(skipped)} run(s) already FINISHED with the same config hash")
        self.progress.update(self.runs_task, total=to_run, completed=0, description=f"runs ({total} planned)")

    def run_started(self, run: PlannedRun, index: int, resumed_from: int) -> None:
        self.current = run
        note = f" (resuming after epoch {resumed_from})" if resumed_from else ""
        self.progress.console.print(f"[bold]▶ {run.name}[/] [dim]{run.config_hash}[/]{note}")
        self.progress.update(self.data_task, visible=False)
        self.progress.update(
            self.epoch_task, total=run.config.train.epochs, completed=resumed_from, visible=True,
            description=f"epochs · {run.name}",
        )

    def data_progress(self, phase: str, done: int, total: int) -> None:
        self.progress.update(self.data_task, description=phase, completed=done, total=total or None, visible=True)

    def step(self, step: int, steps: int) -> None:
        self.progress.update(self.step_task, completed=step, total=steps, visible=True, description="steps")

    def epoch(self, run: PlannedRun, epoch: int, record: dict[str, float]) -> None:
        self.progress.update(self.epoch_task, completed=epoch)
        self.progress.console.print(
            f"  epoch {epoch:>3}: train loss {record[tracking_names.TRAIN_LOSS]:.4f}  "
            f"val loss {record[tracking_names.VAL_LOSS]:.4f}  mAP {record[tracking_names.VAL_MAP]:.4f}  "
            f"F1 {record[tracking_names.VAL_MICRO_F1]:.4f}  {record[tracking_names.EPOCH_TIME]:.1f}s",
            highlight=False,
        )

    def run_finished(self, outcome: RunOutcome) -> None:
        self.progress.advance(self.runs_task)
        self.progress.update(self.step_task, visible=False)
        if outcome.status == "failed":
            self.progress.console.print(f"  [red]FAILED[/] {outcome.reason}", highlight=False)


def summary_table(outcomes: list[RunOutcome]) -> Table:
    table = Table(title="summary")
    for col, justify in (("run", "left"), ("seed", "right"), ("status", "left"), ("best mAP", "right"),
                         ("best F1", "right"), ("s/epoch", "right"), ("img/s", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    colours = {"finished": "green", "failed": "red", "skipped": "dim", "killed": "yellow"}
    for o in outcomes:
        s = o.summary

        def fmt(key: str, spec: str, s: dict = s) -> str:
            return format(s[key], spec) if key in s else "—"

        table.add_row(
            o.run.variant + "".join(f" {k}={v}" for k, v in o.run.grid.items() if k != "seed"),
            str(o.run.config.seed), f"[{colours.get(o.status, 'white')}]{o.status}[/]",
            fmt(tracking_names.best_of(tracking_names.VAL_MAP), ".4f"),
            fmt(tracking_names.best_of(tracking_names.VAL_MICRO_F1), ".4f"),
            fmt(tracking_names.MEAN_EPOCH_TIME, ".2f"), fmt(tracking_names.MEAN_TRAIN_IMAGES_PER_S, ".1f"),
        )
    return table


@app.command("run")
def run(
    file: Annotated[Path, typer.Argument(help="ablation YAML file, e.g. ablations/quickstart.yaml")],
    only: OnlyOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and list the runs, train nothing")] = False,
    tracking_uri: TrackingUriOption = None,
    device: DeviceOption = None,
    set_items: SetOption = None,
    data_root: DataRootOption = None,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="turn the torch.profiler window off")] = False,
    shard_spec: Annotated[
        str | None, typer.Option("--shard", help="i/n: run every n-th planned run starting at i (many workers)")
    ] = None,
    results_dir: Annotated[Path, typer.Option("--results-dir", help="checkpoints, caches, traces")] = Path("results"),
    executor: Annotated[str, typer.Option("--executor", help="local (in this process) or ray (one task per run)")]
    = "local",
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster: auto, ray://host:10001; default starts a local one")
    ] = None,
    nproc: Annotated[
        int, typer.Option("--nproc", help="data-parallel processes per run (starts torchrun; gloo on CPU, NCCL on GPU)")
    ] = 1,
    max_runs: MaxRunsOption = None,
    override_variants: OverrideVariantsOption = False,
) -> int:
    """Train every run of an ablation file under torch.profiler and log it to MLflow (resumable)."""
    if device is not None and device not in ("auto", "cpu", "cuda", "mps"):
        raise HarnessError(f"--device {device!r}: expected auto, cpu, cuda or mps")
    if executor not in ("local", "ray"):
        raise HarnessError(f"--executor {executor!r}: expected local or ray")
    if executor == "ray" and nproc > 1:
        raise HarnessError("--executor ray and --nproc cannot be combined: Ray runs one process per run")
    if nproc < 1:
        raise HarnessError(f"--nproc {nproc}: expected a positive number of processes")
    spec, runs = _plan(file, set_items, data_root, only, shard_spec, max_runs, override_variants)
    if dry_run:
        list_runs(file, set_items, data_root, only, max_runs, override_variants)
        console.print("dry run: nothing trained")
        return 0
    if nproc > 1 and not launched_by_torchrun():
        forwarded = [str(file), "--results-dir", str(results_dir)]
        for flag, values in (("--only", only), ("--set", set_items)):
            for value in values or []:
                forwarded += [flag, value]
        for flag, value in (("--tracking-uri", tracking_uri), ("--device", device), ("--data-root", data_root),
                            ("--shard", shard_spec), ("--max-runs", max_runs)):
            if value is not None:
                forwarded += [flag, str(value)]
        forwarded += ["--no-profile"] if no_profile else []
        forwarded += ["--override-variants"] if override_variants else []
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "harness", "run", *forwarded]
        console.print(f"starting {nproc} data-parallel processes: torchrun --nproc_per_node {nproc} -m harness run ...")
        return subprocess.call(command)
    options = RunnerOptions(tracking_uri, device, not no_profile, results_dir, str(file), executor, address)
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker: rank 0 reports
        run_ablation(spec, runs, options)
        return 0
    started = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    )
    with progress:
        outcomes = run_ablation(spec, runs, options, RichEvents(progress))
    console.print(summary_table(outcomes))
    failed = [o for o in outcomes if o.status == "failed"]
    console.print(
        f"{spec.name}: {sum(o.status == 'finished' for o in outcomes)} finished, {len(failed)} failed, "
        f"{sum(o.status == 'skipped' for o in outcomes)} skipped in {time.perf_counter() - started:.0f}s · "
        f"MLflow experiment '{spec.name}' at {options.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///results/mlflow.db'}",
        highlight=False,
    )
    if failed:
        for o in failed:
            err_console.print(f"[red]failed[/] {o.run.name}: {o.reason}", highlight=False)
        return 1
    return 0
