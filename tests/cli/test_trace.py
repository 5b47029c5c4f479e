"""`harness trace RUN_ID`: the trace's path and op table, from results/ or the run's artifacts; TensorBoard."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.tracking import names

START_TIMEOUT_S = 90.0


def test_trace_prints_the_local_trace_and_the_op_table(tiny_run, capsys):
    assert main(["trace", tiny_run.run_id, "--tracking-uri", tiny_run.uri]) == 0
    out = capsys.readouterr().out
    assert "from results" in out and str(tiny_run.results / "profiles") in out and ".pt.trace.json" in out
    assert "top operators" in out and "self_cpu_ms" in out and "ui.perfetto.dev" in out


def test_trace_comes_from_the_artifacts_when_results_are_gone(tiny_run, tmp_path, capsys):
    profiles = tiny_run.results / "profiles"
    aside = profiles.with_name("profiles-aside")
    profiles.rename(aside)
    try:
        assert main(["trace", tiny_run.run_id, "--tracking-uri", tiny_run.uri, "--dest", str(tmp_path)]) == 0
    finally:
        aside.rename(profiles)
    out = capsys.readouterr().out
    fetched = list((tmp_path / tiny_run.run_id).rglob("*.pt.trace.json.gz"))
    assert "from the run's artifacts" in out and fetched and fetched[0].name in out


def test_trace_of_an_unknown_run_is_one_line(tiny_run, capsys):
    assert main(["trace", "0" * 32, "--tracking-uri", tiny_run.uri]) == 2
    assert "no run" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
            return response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("tensorboard", "torch_tb_profiler")),
                    reason="tensorboard and torch-tb-profiler are not installed (pip install '.[tensorboard]')")
def test_trace_tensorboard_serves_the_profiler_plugin(tiny_run, tmp_path):
    port = _free_port()
    log = tmp_path / "tb.log"
    trace_dir = Path(MlflowClient(tiny_run.uri).get_run(tiny_run.run_id).data.tags[names.TRACE_DIR])
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness", "trace", tiny_run.run_id, "--tracking-uri", tiny_run.uri,
             "--tensorboard", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline, runs = time.monotonic() + START_TIMEOUT_S, None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = _get(f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/runs")
            if runs and trace_dir.name in runs:  # the plugin lists the trace's directory as a run
                break
            time.sleep(1)
        assert runs is not None and trace_dir.name in runs, log.read_text()
        assert _get(f"http://127.0.0.1:{port}/") is not None
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()


def test_trace_tensorboard_without_tensorboard_is_one_line(tiny_run, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["trace", tiny_run.run_id, "--tracking-uri", tiny_run.uri, "--tensorboard"]) == 2
    assert "pip install 'dcn-harness[tensorboard]'" in capsys.readouterr().err

