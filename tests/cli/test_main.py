"""The `harness` entry point: every user mistake ends in a short message and exit status 2, never a traceback."""

from __future__ import annotations

import pytest

from harness.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "x", "--results-dir", "y"], "No such option: --results-dir"),
    (["run"], "Missing argument 'file'"),
    (["bench", "ops", "--reps", "many"], "Invalid value for '--reps'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_usage_errors_exit_2_with_one_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["run", "--help"]) == 0
    assert "Usage: harness run" in capsys.readouterr().out


def test_a_harness_error_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
