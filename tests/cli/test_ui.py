"""`harness ui`: the MLflow server runs in its own process group, and SIGTERM to the harness stops all of it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from harness.cli import main

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:  # noqa: S310
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its exit status waits to be collected)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and _alive(proc):
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.slow
def test_sigterm_stops_the_whole_server_group(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the store
    port = _free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("wb") as out:
        harness = subprocess.Popen(
            [sys.executable, "-m", "harness", "ui", "--port", str(port), "--tracking-uri", uri],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env,
        )
    server_pgid: int | None = None  # set once the server is known to lead a group of its own
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(port):
            if harness.poll() is not None:
                text = log.read_text(errors="replace")
                assert "harness" + os.sep + "cli" not in text, f"harness ui failed:\n{text}"
                pytest.skip(f"MLflow server could not start (exit {harness.returncode}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.skip(f"MLflow server did not answer /health within {START_TIMEOUT_S:.0f}s:\n{_tail(log)}")
            time.sleep(0.5)

        parent = psutil.Process(harness.pid)
        direct = parent.children()
        assert len(direct) == 1, f"expected the one mlflow process under the harness, got {direct}"
        descendants = parent.children(recursive=True)
        pgid = os.getpgid(direct[0].pid)
        assert pgid == direct[0].pid != os.getpgid(harness.pid)  # its own group (and session)
        server_pgid = pgid
        assert len(descendants) >= 2  # mlflow → uvicorn (→ a worker): the group has more than the leader

        os.kill(harness.pid, signal.SIGTERM)  # the harness only, not the group
        stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        rc = harness.wait(timeout=STOP_TIMEOUT_S)
        assert rc == 0, _tail(log)
        while True:
            left = [p for p in descendants if _alive(p)] + _group_members(server_pgid)
            if not left or time.monotonic() > stop_deadline:
                break
            time.sleep(0.2)
        assert not left, f"still running after SIGTERM to the harness: {left}"
        assert not _healthy(port)
        assert "stopped the MLflow UI (SIGTERM)" in log.read_text(errors="replace")
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(timeout=10)
        for proc in descendants:  # whatever a failed run left behind
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if server_pgid is not None and server_pgid != os.getpgid(0):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server_pgid, signal.SIGKILL)


@pytest.mark.parametrize(("argv", "message"), [
    (["--workers", "0"], "--workers 0"),
    (["--port", "70000"], "--port 70000"),
])
def test_bad_options_are_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    rc = main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/missing.db", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
