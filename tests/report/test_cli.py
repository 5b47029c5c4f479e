"""`harness report` and `harness bench report` through the CLI entry point."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main

from .conftest import ReportStore


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_html_default_out_dir_and_env_uri(report_store: ReportStore, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", report_store.uri)
    rc, out, _ = _run(capsys, "report", "dcn_placement")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["dcn_placement.html"]
    assert "17 finished, 1 failed, 1 running" in out and "reports/dcn_placement.html" in out
    rc, out, _ = _run(capsys, "report", "--out", "site")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == [
        "all_failed.html", "dcn_placement.html", "index.html", "no_baseline.html", "xss.html"
    ]


def test_markdown_and_csv(report_store: ReportStore, tmp_path: Path, capsys) -> None:
    rc, out, _ = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--format", "md", "--out", "-")
    assert rc == 0 and out.startswith("## xss") and "| conv (baseline) | 2 |" in out
    rc, out2, _ = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--format", "md")
    assert out2 == out  # stdout is the default for md/csv
    target = tmp_path / "out" / "table.csv"
    rc, out, _ = _run(capsys, "report", "dcn_placement", "--tracking-uri", report_store.uri, "--format", "csv",
                      "--out", str(target), "--baseline", "deform_first2")
    assert rc == 0 and str(target) in out
    frame = pd.read_csv(target)
    assert len(frame) == 6 and list(frame.loc[frame["baseline"], "variant"].unique()) == ["deform_first2"]
    rc, out, _ = _run(capsys, "report", "no_baseline", "--tracking-uri", report_store.uri, "--format", "csv")
    assert list(pd.read_csv(io.StringIO(out))["group"]) == ["solo"]


def test_html_to_stdout(report_store: ReportStore, capsys) -> None:
    rc, out, _ = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--out", "-")
    assert rc == 0 and out.startswith("<!DOCTYPE html>") and out.count("<svg") >= 2
    rc, _, err = _run(capsys, "report", "--tracking-uri", report_store.uri, "--out", "-")
    assert rc == 2 and "exactly one ablation" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown ablation 'nope'"),
        (["--format", "pdf"], "unknown --format 'pdf'"),
        (["dcn_placement", "--baseline", "resnet"], "'resnet' is not a variant"),
        (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach MLflow tracking server"),
        (["--tracking-uri", "sqlite:///{tmp}/missing/mlflow.db"], "does not exist"),
        (["--tracking-uri", "{empty}"], "no harness runs"),
    ],
)
def test_errors_are_one_line(report_store: ReportStore, tmp_path: Path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", report_store.uri)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = _run(capsys, "report", *[a.format(tmp=tmp_path, empty=report_store.empty_uri) for a in args])
    assert rc == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no reports/, no store, no mlruns/


def test_default_store_missing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, _, err = _run(capsys, "report")
    assert rc == 2 and "sqlite:///results/mlflow.db" in err
    assert not (tmp_path / "results").exists()


def test_bench_report_small(capsys) -> None:
    rc, out, _ = _run(capsys, "bench", "report", "--runs", "4", "--epochs", "3", "--repeats", "1", "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["runs"] == 4 and result["median"]["total_s"] > 0 and result["html_bytes"] > 10_000
    assert "cpu" in result["machine"]
