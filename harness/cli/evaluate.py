"""`harness eval`: robustness, offset statistics, sampling locations and ERF of trained runs (docs/analysis.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.analysis import AnalysisOptions, analyze_runs
from harness.cli.app import TrackingUriOption, app, console
from harness.errors import HarnessError
from harness.tracking import names

_PARTS = ("robustness", "offsets", "sampling", "erf")


def _parse_only(values: list[str] | None) -> tuple[str, ...]:
    if not values:
        return _PARTS
    parts: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part not in _PARTS:
                raise HarnessError(f"--only {part!r}: choose from {', '.join(_PARTS)}")
            if part not in parts:
                parts.append(part)
    return tuple(parts)


def _parse_chain(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        chain = sorted({int(p) for p in text.replace(" ", "").split(",") if p})
    except ValueError:
        raise HarnessError(f"--chain {text!r}: expected conv indices such as 0,1") from None
    if not chain or chain != list(range(chain[0], chain[-1] + 1)) or chain[0] < 0:
        raise HarnessError(f"--chain {text!r}: expected consecutive conv indices such as 0,1 or 9,10")
    return chain


@app.command("eval")
def eval_command(
    target: Annotated[
        str, typer.Argument(help="a child run id, a parent run id, or an ablation name (all its finished runs)")
    ],
    tracking_uri: TrackingUriOption = None,
    results_dir: Annotated[
        Path, typer.Option("--results-dir", help="where `harness run` put checkpoints/ and cache/")
    ] = Path("results"),
    data_root: Annotated[
        Path | None,
        typer.Option("--data-root", help="COCO root, if it moved since training (default: the run's data.root)"),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")] = "auto",
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="parts: robustness, offsets, sampling, erf (repeatable or comma-separated)"),
    ] = None,
    sampling_images: Annotated[int, typer.Option("--sampling-images", help="val images in the sampling figure")] = 3,
    erf_images: Annotated[int, typer.Option("--erf-images", help="val images averaged in the ERF (0: all)")] = 64,
    chain: Annotated[
        str | None, typer.Option("--chain", help="consecutive conv indices composed in the sampling figure, e.g. 0,1")
    ] = None,
) -> None:
    """Analyse trained runs and log the results into their MLflow runs (which stay FINISHED)."""
    options = AnalysisOptions(
        parts=_parse_only(only), sampling_images=sampling_images, erf_images=erf_images, chain=_parse_chain(chain)
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        transient=True,
    ) as progress:
        runs_task = progress.add_task("runs", total=None)
        part_task = progress.add_task("", total=None, visible=False)

        def on_run(index: int, total: int, name: str) -> None:
            progress.update(runs_task, total=total, completed=index, description=f"runs · {name}")
            progress.console.print(f"[bold]▶ {name}[/]", highlight=False)

        def on_progress(phase: str, done: int, total: int) -> None:
            progress.update(part_task, description=phase, completed=done, total=total or None, visible=True)

        done = analyze_runs(
            target, tracking_uri=tracking_uri, results_dir=results_dir, options=options, device=device,
            data_root=data_root, progress=on_progress, on_run=on_run,
        )
    table = Table(title=f"harness eval {target}: {len(done)} run(s) analysed")
    table.add_column("run", no_wrap=True)
    for col in ("val mAP", "worst mAP ratio", "mean |Δp| per layer", "eff. dilation", "ERF px"):
        table.add_column(col, justify="right")
    for item in done:
        r = item.result
        frame = r.robustness
        val_map, worst = "—", "—"
        if frame is not None and len(frame):
            val_map = f"{frame.loc[frame['identity'], 'map'].iloc[0]:.4f}"
            row = frame.loc[frame["rel_map"].idxmin()]
            worst = f"{row['rel_map']:.2f} {row['family']} {row['magnitude']:g}"
        offs = r.offsets.table[r.offsets.table["region"] == "all"] if r.offsets is not None else None
        mean_abs = ", ".join(f"{v:.2f}" for v in offs["mean_abs"]) if offs is not None else "—"
        dil = ", ".join(f"{v:.2f}" for v in offs["eff_dilation"]) if offs is not None else "—"
        table.add_row(item.name, val_map, worst, mean_abs, dil, f"{r.erf.rms_radius:.1f}" if r.erf else "—")
    console.print(table)
    metrics = ", ".join(f"{prefix}*" for prefix in names.ANALYSIS_METRIC_PREFIXES)
    artifacts = f"{names.ANALYSIS_ARTIFACT_DIR}/*"
    console.print(f"logged to MLflow ({len(done)} run(s)): metrics {metrics}; artifacts {artifacts}")
