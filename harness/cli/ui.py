"""`harness ui`: the MLflow UI on the harness store, and the server lifetime that `harness trace --tensorboard`
shares: the server runs in a process group of its own, and a stop request ends all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Annotated

import typer

from harness.cli.app import app, console, err_console
from harness.errors import HarnessError
from harness.tracking.uri import check_store, resolve_uri

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 10.0


def check_address(host: str, port: int) -> None:
    """A one-line error for a port outside 1..65535 or an empty host."""
    if not 0 < port < 65536:
        raise HarnessError(f"--port {port}: expected a port number between 1 and 65535")
    if not host.strip():
        raise HarnessError("--host: expected an interface address such as 127.0.0.1")


def mlflow_ui_command(uri: str, host: str, port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", str(workers)]


@app.command("ui")
def ui(
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow store to browse")] = None,
    port: Annotated[int, typer.Option(help="port to listen on")] = 5000,
    host: Annotated[str, typer.Option(help="interface to bind; 0.0.0.0 exposes the UI to the network")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(help="MLflow server worker processes")] = 1,
) -> int:
    """Open the MLflow UI on the harness store (bound to 127.0.0.1 unless --host says otherwise)."""
    check_address(host, port)
    if workers < 1:
        raise HarnessError(f"--workers {workers}: expected a positive number of worker processes")
    uri = resolve_uri(tracking_uri)
    check_store(uri, create=False)
    console.print(f"MLflow UI for {uri} on http://{host}:{port}/#/experiments?workflowType=machine_learning "
                  "(Ctrl-C to stop)", highlight=False, soft_wrap=True)
    return serve(mlflow_ui_command(uri, host, port, workers), "the MLflow UI")


class _StopRequested(Exception):
    """Raised by the signal handler of `serve` to leave the wait for the server."""


def serve(command: list[str], what: str, grace_s: float = STOP_GRACE_S) -> int:
    """Run `command` (a server) in a process group of its own until it exits or this process gets SIGTERM, SIGINT or
    SIGHUP; then stop the server's whole process group (it forks workers). The exit status of the server,
    or 0 when it was stopped on request."""
    received: list[int] = []
    armed = False

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if armed and len(received) == 1:
            raise _StopRequested

    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS} if in_main_thread else {}
    try:
        # a new process group (setsid): a terminal's Ctrl-C reaches only the harness, which stops the group in order
        proc = subprocess.Popen(command, start_new_session=True)
        try:
            armed = True
            if not received:  # a signal that came while the server was starting
                proc.wait()
        except _StopRequested:
            pass
        finally:
            armed = False
            _stop_group(proc, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        console.print(f"stopped {what} ({signal.Signals(received[0]).name})", highlight=False)
        return 0
    return proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still exists
        return True
    return True


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group led by `proc`, SIGKILL it when anything is left after `grace_s`; reap `proc`."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or it would count as alive
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        err_console.print(f"the server did not stop within {grace_s:.0f}s of SIGTERM; killing it", highlight=False)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
