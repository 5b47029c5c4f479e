"""`harness report` (HTML / Markdown / CSV from the MLflow store) and `harness bench report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from harness.bench import machine_description
from harness.cli.app import TrackingUriOption, app, bench_app, console, err_console
from harness.errors import HarnessError
from harness.report.bench import bench_report
from harness.report.data import AblationData, load_ablations
from harness.report.render import (
    comparison_csv,
    comparison_markdown,
    render_ablation_html,
    write_html_reports,
    write_text_atomic,
)
from harness.tracking.names import report_artifact
from harness.tracking.query import Store, open_store
from harness.tracking.reports import attach_report

FORMATS = ("html", "md", "csv")


@app.command("report")
def report(
    ablations: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ABLATION",
            help="ablation names (MLflow experiments); default: every experiment with harness runs",
        ),
    ] = None,
    tracking_uri: TrackingUriOption = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="html: output directory (default reports/), or a .html file for one ablation; "
            "md/csv: output file (default -: stdout)",
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="html, md or csv")] = "html",
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", help="variant to compare against (default: the experiment's harness.baseline)"),
    ] = None,
    attach: Annotated[
        bool, typer.Option("--attach/--no-attach", help="html: log each page on its ablation's parent runs")
    ] = True,
) -> None:
    """Report on ablation runs stored in MLflow: one offline HTML page per ablation, or the comparison table."""
    if fmt not in FORMATS:
        raise HarnessError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    one_file = fmt in ("md", "csv") or out == "-" or (out is not None and out.endswith(".html"))
    _check_out(out, fmt, one_file)  # before the store is read: a wrong --out fails at once
    store = open_store(tracking_uri)
    datas = load_ablations(store, ablations or None, baseline=baseline, with_artifacts=fmt == "html")
    if fmt in ("md", "csv"):
        text = comparison_markdown(datas) if fmt == "md" else comparison_csv(datas)
        if out in (None, "-"):
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        path = Path(out)
        write_text_atomic(path, text, "Markdown report" if fmt == "md" else "CSV report")
        console.print(f"wrote {path}", highlight=False)
        return
    if one_file:
        if len(datas) != 1:
            raise HarnessError(f"--out {out} takes exactly one ablation, got {len(datas)}; give a directory instead")
        html = render_ablation_html(datas[0])
        if out == "-":
            sys.stdout.write(html)
            sys.stdout.flush()
        else:
            path = Path(out)
            write_text_atomic(path, html, "HTML report")
            console.print(f"wrote {path}", highlight=False)
        if attach:
            _attach(store, datas[0], html, quiet=out == "-")
        return
    paths = write_html_reports(datas, Path(out or "reports"))
    pages = paths[1:] if len(datas) > 1 else paths  # the index comes first when there are several
    for data, page in zip(datas, pages, strict=True) if attach else ():
        _attach(store, data, page.read_text(encoding="utf-8"))
    for data in datas:
        n = data.runs["state"].value_counts() if not data.runs.empty else {}
        console.print(
            f"{data.name}: {n.get('finished', 0)} finished, {n.get('failed', 0)} failed, "
            f"{n.get('running', 0)} running",
            highlight=False,
            markup=False,
        )
    for path in paths:
        console.print(f"wrote {path}", highlight=False, markup=False)


def _attach(store: Store, data: AblationData, html: str, quiet: bool = False) -> None:
    """Log the page on the ablation's parent runs; a store that refuses it is reported, the page stands."""
    attached, failure = attach_report(store, data.experiment_id, data.name, html)
    if failure:
        err_console.print(f"[yellow]{data.name}: report not logged on every parent run:[/] {failure}", highlight=False)
    elif attached and not quiet:
        console.print(f"{data.name}: logged on {attached} parent run(s) as {report_artifact(data.name)}",
                      highlight=False, markup=False)


def _check_out(out: str | None, fmt: str, one_file: bool) -> None:
    """A one-line error when --out names a directory where a file is written, or a file where a directory is."""
    if out is None or out == "-":
        return
    path = Path(out)
    if one_file and path.is_dir():
        raise HarnessError(f"--out {out} is a directory; give a file name for --format {fmt}")
    if not one_file and path.exists() and not path.is_dir():
        raise HarnessError(
            f"--out {out} is a file; --format html writes one page per ablation into a directory "
            "(or name a .html file for one ablation)"
        )


@bench_app.command("report")
def bench_report_command(
    runs: Annotated[int, typer.Option(help="synthetic runs to write")] = 100,
    epochs: Annotated[int, typer.Option(help="epochs per synthetic run")] = 50,
    repeats: Annotated[int, typer.Option(help="timed report runs (median reported)")] = 3,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="time an existing store instead of a synthetic one")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Time `harness report` (HTML) end to end on a store of 100 runs × 50 epochs (docs/report.md)."""
    if runs < 1 or epochs < 1 or repeats < 1:
        raise HarnessError("--runs, --epochs and --repeats must be at least 1")
    with console.status("benchmarking") as status:
        result = bench_report(runs, epochs, repeats, tracking_uri, progress=status.update)
    result["machine"] = machine_description()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"harness report on {result['tracking_uri']} (median of {repeats})")
    for name in ("open", "load", "render", "total"):
        table.add_column(f"{name} s", justify="right")
    med = result["median"]
    table.add_row(*(f"{med[f'{k}_s']:.2f}" for k in ("open", "load", "render", "total")))
    console.print(table)
    totals = ", ".join(f"{t:.2f}" for t in result["totals_s"])
    console.print(f"all totals: {totals} s; HTML {result['html_bytes']:,} bytes")
    console.print(f"machine: {result['machine']}", highlight=False)
