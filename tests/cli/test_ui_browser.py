"""`harness ui` in a real browser: headless Chromium renders the MLflow UI over a store `harness run` wrote, and
shows the model-training view, the ablation's description, the nested runs, their source and datasets."""

from __future__ import annotations

import os
import shutil
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

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START_TIMEOUT_S = 90.0
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:  # noqa: S310
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _dom(url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran (Chromium's virtual time lets the app fetch and render)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=False,
    )
    return done.stdout


@pytest.fixture(scope="module")
def ui_server(tiny_run, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "harness", "ui", "--tracking-uri", tiny_run.uri, "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(port) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert _healthy(port), log.read_text(errors="replace")
    yield f"http://127.0.0.1:{port}", log
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_the_mlflow_ui_shows_training_runs_description_and_nested_runs(tiny_run, ui_server, tmp_path):
    base, log = ui_server
    assert "workflowType=machine_learning" in log.read_text(errors="replace")
    client = MlflowClient(tiny_run.uri)
    experiment = client.get_experiment_by_name("tiny")
    parent = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'parent'")[0]
    dom = _dom(f"{base}/#/experiments/{experiment.experiment_id}/runs", tmp_path)
    assert "Training runs" in dom  # the model-training view (experimentKind), not the GenAI one
    assert "Tiny ablation for the command-line tests" in dom  # the experiment's description
    assert parent.info.run_name in dom

    child = client.get_run(tiny_run.run_id)
    page = _dom(f"{base}/#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}", tmp_path)
    assert child.info.run_name in page and "of ablation" in page  # the run's description
    assert "Parent run" in page and parent.info.run_name in page  # nested under the parent
    assert "coco/train2017" in page  # its dataset input
    assert "tiny.yaml" in page  # its source, mlflow.source.name (the UI shows its last path component)
