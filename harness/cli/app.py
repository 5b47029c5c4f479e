"""The Typer application and its sub-command groups; command modules attach to these."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from harness import settings

app = typer.Typer(
    name="harness",
    help="Benchmark and ablation harness for deformable convolution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Speed and memory benchmarks (figures for docs/benchmarks.md).", no_args_is_help=True)
data_app = typer.Typer(help="Inspect, generate and download COCO-format data.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

# Options several commands share, declared once.
TrackingUriOption = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)"),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="auto | cpu | cuda | mps (overrides train.device)")
]
DataRootOption = Annotated[
    Path | None,
    typer.Option(
        "--data-root", help=f"COCO root (annotations/ + <split>/ images); or ${settings.variable('coco_root')}"
    ),
]
