"""`harness tune`: Optuna learning-rate searches from an ablation file's `search:` section (docs/tuning.md)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness import settings
from harness.cli.app import DataRootOption, DeviceOption, TrackingUriOption, app, console
from harness.errors import HarnessError
from harness.planning import expand, load_ablation, parse_set, select
from harness.tracking.optuna_storage import DEFAULT_STORAGE, resolve_storage
from harness.tracking.uri import mask_url
from harness.tune import (
    PlannedStudy,
    StudyOutcome,
    TrialResult,
    TuneEvents,
    TuneOptions,
    plan_studies,
    resolve_search,
    split_overrides,
    tune,
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


class RichTuneEvents(TuneEvents):
    """Live progress: each study's trials done/target, data preparation, one line per finished trial."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.trials_task = progress.add_task("trials", total=None, visible=False)
        self.data_task = progress.add_task("data", total=None, visible=False)
        self.metric = ""

    def study_started(self, study: PlannedStudy, target: int, counted: int) -> None:
        self.metric = study.search.objective.metric
        if counted >= target:
            note = f"[dim]already holds {counted} of {target} trials: nothing to run[/]"
        else:
            note = f"[dim]{counted} of {target} trials exist: running the rest[/]" if counted else ""
        self.progress.console.print(f"[bold]▶ {study.name}[/] {note}".rstrip())
        self.progress.update(self.trials_task, total=target, completed=counted, visible=counted < target,
                             description=f"trials · {study.name}")

    def data_progress(self, phase: str, done: int, total: int) -> None:
        self.progress.update(self.data_task, description=phase, completed=done, total=total or None, visible=True)

    def trial_started(self, study: PlannedStudy, number: int, params: dict[str, Any]) -> None:
        self.progress.update(self.data_task, visible=False)

    def epoch(self, study: PlannedStudy, number: int, epoch: int, value: float) -> None: ...

    def trial_finished(self, study: PlannedStudy, result: TrialResult) -> None:
        self.progress.advance(self.trials_task)
        colour = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(result.state, "white")
        detail = f"{self.metric} {result.value:.4g}" if result.value is not None else ""
        if result.reason:
            detail = f"{detail}  {result.reason}".strip()
        self.progress.console.print(
            f"  #{result.number:<3} {_params(result.params)}  [{colour}]{result.state}[/]  {detail}", highlight=False
        )

    def study_finished(self, outcome: StudyOutcome) -> None:
        self.progress.update(self.trials_task, visible=False)
        self.progress.update(self.data_task, visible=False)


def summary_table(outcomes: list[StudyOutcome]) -> Table:
    metric = ", ".join(sorted({o.metric for o in outcomes})) or "objective"
    table = Table(title="studies")
    for col, justify in (("study", "left"), ("trials", "right"), ("ok/pruned/failed", "right"), ("new", "right"),
                         ("best lr", "right"), (f"best {metric}", "right"), ("best #", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for o in outcomes:
        c = o.counts
        table.add_row(
            o.name, f"{o.counted}/{o.target}" + (f" ({c['RUNNING']} running)" if c["RUNNING"] else "")
            + (f" +{o.interrupted} interrupted" if o.interrupted else ""),
            f"{c['COMPLETE']}/{c['PRUNED']}/" + (f"[red]{c['FAIL'] - o.interrupted}[/]" if c["FAIL"] - o.interrupted
                                                 else "0"), str(o.new_trials),
            f"{o.best_lr:.3g}" if o.best_lr is not None else "—",
            f"{o.best_value:.4g} ({o.direction[:3]})" if o.best_value is not None else "—",
            str(o.best_trial) if o.best_trial is not None else "—",
        )
    return table


def quiet_optuna() -> None:
    """No per-trial INFO lines from Optuna (the progress display says it), no experimental-API warnings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@app.command("tune")
def tune_command(
    file: Annotated[Path, typer.Argument(help="ablation YAML file with a search: section (ablations/lr_search.yaml)")],
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", help="trials per study, counting those it already has "
                                 "(default: search.n_trials)")
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Optuna storage URL shared by every worker; default "
                                 f"${settings.variable('optuna_storage')} or {DEFAULT_STORAGE}")
    ] = None,
    n_jobs: Annotated[int, typer.Option("--n-jobs", help="trials run at once in threads of this process")] = 1,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="seconds after which no new trial starts (running ones finish)")
    ] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="glob over variant or run names (repeatable)")]
    = None,
    set_items: Annotated[
        list[str] | None, typer.Option("--set", help="key.path=value (repeatable): config keys for every trial, "
                                       "grid.<axis>=[..], or search.<key> (e.g. search.pruner=none)")
    ] = None,
    data_root: DataRootOption = None,
    tracking_uri: TrackingUriOption = None,
    device: DeviceOption = None,
    results_dir: Annotated[Path, typer.Option("--results-dir", help="data caches, generated data")] = Path("results"),
) -> int:
    """Search each variant's learning rate with Optuna (resumable; many workers may share one --storage)."""
    if device is not None and device not in ("auto", "cpu", "cuda", "mps"):
        raise HarnessError(f"--device {device!r}: expected auto, cpu, cuda or mps")
    if n_trials is not None and n_trials < 1:
        raise HarnessError(f"--n-trials {n_trials}: give at least 1")
    if n_jobs < 1:
        raise HarnessError(f"--n-jobs {n_jobs}: give at least 1")
    if timeout is not None and not timeout > 0:
        raise HarnessError(f"--timeout {timeout:g}: give a positive number of seconds")
    spec = load_ablation(file)
    search_overrides, config_overrides = split_overrides(parse_set(set_items))
    search = resolve_search(spec, search_overrides, source=str(file))
    runs = select(expand(spec, config_overrides, data_root, source=str(file), storage=storage), only)
    studies = plan_studies(spec, search, runs)
    quiet_optuna()
    options = TuneOptions(storage, tracking_uri, n_trials, n_jobs, device, results_dir, str(file), timeout)
    started = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )
    with progress:
        outcomes = tune(spec, studies, options, RichTuneEvents(progress))
    console.print(summary_table(outcomes))
    new = sum(o.new_trials for o in outcomes)
    console.print(
        f"{spec.name}: {len(outcomes)} stud{'y' if len(outcomes) == 1 else 'ies'}, {new} new trial(s) in "
        f"{time.perf_counter() - started:.0f}s · Optuna storage {mask_url(resolve_storage(storage))} · "
        f"MLflow experiment '{spec.name}'",
        highlight=False,
    )
    short = [o.name for o in outcomes if o.counted < o.target]
    if timeout is not None and short:
        console.print(f"--timeout {timeout:g}s reached: {', '.join(short)} short of target; rerun to continue",
                      highlight=False)
    done = [o for o in outcomes if o.best_lr is not None]
    if done:
        console.print(f"reuse with: train.lr: {{from_study: {done[0].name}}}", highlight=False)
    empty = [o for o in outcomes if o.counts["COMPLETE"] == 0 and o.counts["RUNNING"] == 0]
    return 1 if empty else 0
