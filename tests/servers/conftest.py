"""Real servers for the scale-out tests: a throwaway PostgreSQL cluster and an MLflow tracking server on it.

The cluster lives in a temporary directory, listens on 127.0.0.1 at a free port and is stopped (and
deleted) at the end of the session. PostgreSQL refuses to run as root, so under root `initdb` and
`pg_ctl` run as the `postgres` user (`runuser`). Tests skip, saying why, where the PostgreSQL server
binaries (Debian's `postgresql` package) or the psycopg driver (SQLAlchemy's default for
`postgresql://`) are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, else the directory of `initdb` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresCluster:
    """One PostgreSQL cluster; `database(name)` creates a database and gives its SQLAlchemy URL."""

    bin_dir: Path
    home: Path
    port: int
    run_as: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.run_as, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-o", options, "-l",
                  str(self.home / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def url(self, name: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A running throwaway PostgreSQL cluster on 127.0.0.1 (skips where PostgreSQL or psycopg is missing)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install -e '.[dev]'")
    bin_dir = postgres_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql; .ci/run installs it)")
    run_as: list[str] = []
    # under /tmp, not pytest's tmp_path: the postgres user cannot enter root's 0700 pytest directories
    home = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without `runuser` to start PostgreSQL as the postgres user")
        os.chown(home, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    cluster = PostgresCluster(bin_dir, home, free_port(), run_as)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class MlflowServer:
    url: str
    backend: str
    artifacts: Path


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    """Until `url` answers 200; fails with the server's log when the process exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on a PostgreSQL back end, serving artifacts from a temporary directory."""
    home = tmp_path_factory.mktemp("mlflow-server")
    backend = postgres.database("mlflow")
    port = free_port()
    log = home / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
               "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=home, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process, log)
        yield MlflowServer(f"http://127.0.0.1:{port}", backend, home / "artifacts")
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group this fixture started (the server and its workers), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class RestartableServer:
    """An `mlflow server` on a sqlite back end that a test stops and starts again on the same port and store."""

    home: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.home}/mlflow.db",
                   "--serve-artifacts", "--artifacts-destination", str(self.home / "artifacts"), "--host",
                   "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = self.home / "server.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=self.home,
                                            start_new_session=True)
        wait_http(f"{self.url}/health", self.process, log)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None


@pytest.fixture(scope="module")
def restartable_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    """A tracking server of the fault tests (sqlite store, artifacts served) that a test may stop and restart;
    each test leaves it running and uses an experiment of its own."""
    server = RestartableServer(tmp_path_factory.mktemp("mlflow-restart"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
