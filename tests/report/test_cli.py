"""`harness report` and `harness bench report` through the CLI entry point."""

from __future__ import annotations

import errno
import io
import json
import os
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


# ------------------------------------------------------------------------------------ unwritable --out


def _one_error(rc: int, err: str, *parts: str) -> None:
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, err


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _read_only_dir(path: Path) -> Path:
    """`path` made read-only; skips the test where that does not stop writes (root ignores permission bits)."""
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0 or os.access(path, os.W_OK):
        path.chmod(0o755)
        pytest.skip("running as root: a read-only folder is writable anyway (the tests under a file cover it)")
    return path


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: nothing can be created under it, not even by root."""
    path = tmp_path / "blocker"
    path.write_text("keep me\n")
    return path


def test_html_out_is_an_existing_file(report_store: ReportStore, tmp_path: Path, blocker: Path, capsys) -> None:
    rc, _, err = _run(capsys, "report", "--tracking-uri", report_store.uri, "--out", str(blocker))
    _one_error(rc, err, f"--out {blocker} is a file", "directory")
    assert blocker.read_text() == "keep me\n" and _files(tmp_path) == ["blocker"]


@pytest.mark.parametrize(
    ("fmt", "out", "message"),
    [
        ("html", "{b}/site", "HTML reports: cannot create {b}/site: {b} is a file"),
        ("html", "{b}/x/xss.html", "HTML report {b}/x/xss.html: cannot create {b}/x: {b} is a file"),
        ("md", "{b}/table.md", "Markdown report {b}/table.md: {b} is a file, not a directory"),
        ("csv", "{b}/a/table.csv", "CSV report {b}/a/table.csv: cannot create {b}/a: {b} is a file"),
    ],
)
def test_out_under_a_file(report_store: ReportStore, tmp_path: Path, blocker: Path, capsys, fmt, out, message) -> None:
    out, message = out.format(b=blocker), message.format(b=blocker)
    rc, _, err = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--format", fmt, "--out", out)
    _one_error(rc, err, message)
    assert blocker.read_text() == "keep me\n" and _files(tmp_path) == ["blocker"]


@pytest.mark.parametrize(
    ("fmt", "out", "message"),
    [
        ("html", "{ro}", "HTML reports: {ro} is not writable"),
        ("html", "{ro}/site", "HTML reports: cannot create {ro}/site: Permission denied"),
        ("html", "{ro}/xss.html", "HTML report {ro}/xss.html: {ro} is not writable"),
        ("md", "{ro}/table.md", "Markdown report {ro}/table.md: {ro} is not writable"),
        ("csv", "{ro}/sub/table.csv", "CSV report {ro}/sub/table.csv: cannot create {ro}/sub: Permission denied"),
    ],
)
def test_out_in_a_read_only_folder(report_store: ReportStore, tmp_path: Path, capsys, fmt, out, message) -> None:
    ro = _read_only_dir(tmp_path / "ro")
    try:
        out, message = out.format(ro=ro), message.format(ro=ro)
        rc, _, err = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--format", fmt, "--out", out)
        _one_error(rc, err, message)
        assert _files(tmp_path) == ["ro"]
    finally:
        ro.chmod(0o755)


def test_html_write_failure_leaves_the_old_page(report_store: ReportStore, tmp_path: Path, monkeypatch,
                                                capsys) -> None:
    """A write that fails half-way (here: the disk fills before the rename) keeps the previous page whole
    and leaves no temporary file."""
    from harness.report import render

    site = tmp_path / "site"
    site.mkdir()
    (site / "xss.html").write_text("old page\n")
    real_replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith(".html"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(render.os, "replace", full_disk)
    rc, _, err = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--out", str(site))
    _one_error(rc, err, f"HTML report {site / 'xss.html'}: cannot write: No space left on device")
    assert _files(site) == ["xss.html"] and (site / "xss.html").read_text() == "old page\n"
    rc, _, err = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--format", "csv",
                      "--out", str(site / "t.html"))
    assert rc == 2 and _files(site) == ["xss.html"]
    monkeypatch.undo()
    rc, _, _ = _run(capsys, "report", "xss", "--tracking-uri", report_store.uri, "--out", str(site))
    assert rc == 0 and _files(site) == ["xss.html"]  # overwritten in place, no temporary file left
    page = site / "xss.html"
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert page.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
