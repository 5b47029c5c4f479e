"""`harness` command line: thin wrappers that call the library and print for the user.

User mistakes arrive as `HarnessError` and are printed as one line with exit status 2.
"""

from __future__ import annotations

import logging
import sys
import warnings

import click
import typer
from rich.markup import escape

from harness import settings
from harness.cli import bench, data, evaluate, examples, report, run, trace, tune, ui, version  # noqa: F401
from harness.cli.app import app, err_console  # the command modules above register on app
from harness.errors import HarnessError, HarnessWarning, TrackingUnreachable


def _click_errors() -> tuple[type[Exception], ...]:
    """click's ClickException, and the copy of it that newer typer (0.2x) ships as typer._click and raises
    instead (a wrong option would otherwise end in a traceback)."""
    errors: list[type[Exception]] = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        pass
    else:
        errors.append(ClickException)
    return tuple(errors)


_CLICK_ERRORS = _click_errors()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """The harness's own warnings as one line each; others as Python prints them."""
    if issubclass(category, HarnessWarning):
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: sys.argv) and return the exit status."""
    settings.apply_mlflow_defaults()  # before mlflow is first imported
    warnings.showwarning = _show_warning
    for noisy in ("mlflow", "alembic", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = app(args=argv, standalone_mode=False, prog_name="harness")
    except HarnessError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1 if isinstance(exc, TrackingUnreachable) else 2
    except (click.exceptions.Abort, typer.Abort):
        err_console.print("aborted")
        return 130
    except _CLICK_ERRORS as exc:  # usage errors: click prints them in one short block
        exc.show()
        return exc.exit_code
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    return result if isinstance(result, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
