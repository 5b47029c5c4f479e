"""`harness trace RUN_ID`: where a run's profiler trace is, its op table, and optionally TensorBoard on it.

The trace is a Chrome trace JSON file: https://ui.perfetto.dev opens it directly (no server). TensorBoard
with the torch-tb-profiler plugin is an optional extra (`pip install 'dcn-harness[tensorboard]'`).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from harness.cli.app import TrackingUriOption, app, console
from harness.cli.ui import check_address, serve
from harness.errors import HarnessError
from harness.tracking.artifacts import RunTrace, find_trace

TENSORBOARD_MODULES = ("tensorboard", "torch_tb_profiler")


def op_table(text: str, rows: int) -> Table | None:
    """The op table CSV (name, calls, self_cpu_ms, ...) as a rich table of its first `rows` rows."""
    records = list(csv.reader(io.StringIO(text)))
    if len(records) < 2:
        return None
    table = Table(title="top operators (profiling window)")
    for i, column in enumerate(records[0]):
        table.add_column(column, justify="left" if i == 0 else "right")
    for record in records[1 : rows + 1]:
        table.add_row(*record)
    return table


def tensorboard_command(trace: RunTrace, host: str, port: int) -> list[str]:
    """TensorBoard on the directory above the trace's: the plugin lists each subdirectory as a run."""
    missing = [m for m in TENSORBOARD_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise HarnessError(f"--tensorboard needs {' and '.join(missing)}: pip install 'dcn-harness[tensorboard]'")
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(trace.directory.parent), "--host", host,
            "--port", str(port)]


@app.command("trace")
def trace(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a child (training) run")],
    tracking_uri: TrackingUriOption = None,
    dest: Annotated[Path, typer.Option("--dest", help="where a trace fetched from the run's artifacts goes")]
    = Path("results/traces"),
    rows: Annotated[int, typer.Option("--rows", help="op table rows to print")] = 15,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="serve it in TensorBoard (torch-tb-profiler)")]
    = False,
    host: Annotated[str, typer.Option(help="TensorBoard's interface")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TensorBoard's port")] = 6006,
) -> int:
    """Print where a run's profiler trace is (open it in https://ui.perfetto.dev) and its top operators."""
    check_address(host, port)
    found = find_trace(tracking_uri, run_id, dest)
    where = "results" if found.source == "local" else "the run's artifacts"
    console.print(f"trace of {found.run_name} (from {where}):", highlight=False)
    for path in found.files:
        console.print(f"  {path}", highlight=False, soft_wrap=True)
    table = op_table(found.op_table_csv, rows)
    if table is not None:
        console.print(table)
    console.print("open the file in https://ui.perfetto.dev (drag and drop; nothing leaves the browser)",
                  highlight=False)
    if not tensorboard:
        return 0
    command = tensorboard_command(found, host, port)
    console.print(f"TensorBoard (PyTorch Profiler tab) on http://{host}:{port} (Ctrl-C to stop)", highlight=False)
    return serve(command, "TensorBoard")
