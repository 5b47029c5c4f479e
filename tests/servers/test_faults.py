"""Faults of docs/scaling.md's server setup: a worker lost with its results directory (no shared disk) resumes
elsewhere from the checkpoint artifact, and a tracking server restarted mid-run is waited for."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.tracking import names


def ablation(path: Path, root: Path, name: str, epochs: int, variants: str) -> Path:
    path.write_text(f"""
name: {name}
baseline: standard
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3}}
  train: {{epochs: {epochs}, batch_size: 8, lr: 0.003, threads: 1, log_checkpoint: true}}
  profile: {{enabled: false}}
  analysis: {{enabled: false}}
variants:
{variants}
""")
    return path


def harness_run(file: Path, uri: str, results: Path, **env: str) -> subprocess.Popen[str]:
    """One worker; alone on its config, so it need not wait for a rival's run to show (HARNESS_CLAIM_SETTLE_S)."""
    env = {"HARNESS_CLAIM_SETTLE_S": "0", **env}
    command = [sys.executable, "-m", "harness", "run", str(file), "--tracking-uri", uri, "--results-dir", str(results)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env})


def all_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], "") if experiment is not None else []


def wait_for_epoch(client: MlflowClient, name: str, epoch: int, worker: subprocess.Popen[str]) -> None:
    """Until a child run of `name` logged `epoch` (polls the server; fails when the worker ends first)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert worker.poll() is None, f"the worker ended first:\n{worker.communicate()[0][-3000:]}"
        for run in all_runs(client, name):
            if run.data.tags.get(names.ROLE) == names.CHILD and run.data.metrics.get(names.VAL_MAP) is not None:
                if max(m.step for m in client.get_metric_history(run.info.run_id, names.VAL_MAP)) >= epoch:
                    return
        time.sleep(0.2)
    raise AssertionError(f"no child run of {name} reached epoch {epoch} within 120 s")


@contextlib.contextmanager
def frozen(worker: subprocess.Popen[str]) -> Iterator[None]:
    """The worker stopped (SIGSTOP) for the block, then let go: a server taken down inside it is met by the
    worker's next call, however few calls a run of tiny epochs has left to make."""
    assert worker.poll() is None, f"the worker ended first:\n{worker.communicate()[0][-3000:]}"
    worker.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        worker.send_signal(signal.SIGCONT)


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, names.VAL_MAP))


def test_lost_worker_resumes_from_the_checkpoint_artifact_elsewhere(mlflow_server, synth_root, tmp_path) -> None:
    epochs = 5
    file = ablation(tmp_path / "lost.yaml", synth_root, "lostworker", epochs,
                    "  standard: {model: {deform_layers: none}}\n  deform: {model: {deform_layers: \"first:1\"}}")
    client = MlflowClient(mlflow_server.url)
    first = harness_run(file, mlflow_server.url, tmp_path / "results-a")
    try:
        wait_for_epoch(client, "lostworker", 2, first)
    finally:
        first.send_signal(signal.SIGKILL)  # the machine is gone, and its results directory with it
        first.wait(timeout=30)

    second = harness_run(file, mlflow_server.url, tmp_path / "results-b")  # another machine: nothing local
    output = second.communicate(timeout=240)[0]
    assert second.returncode == 0, output[-3000:]

    runs = all_runs(client, "lostworker")
    children = [r for r in runs if r.data.tags.get(names.ROLE) == names.CHILD]
    assert sorted(r.info.run_name for r in children) == ["deform", "standard"], "runs lost 0, duplicated 0"
    assert [r for r in runs if r.info.status == "RUNNING"] == [], "left RUNNING 0"
    assert {r.info.status for r in children} == {"FINISHED"}
    resumed = [r for r in children if names.RESUMED_FROM_EPOCH in r.data.tags]
    assert len(resumed) == 1, "the killed run resumed, the other trained from the start"
    assert int(resumed[0].data.tags[names.RESUMED_FROM_EPOCH]) >= 2, "from the artifact's epoch, not from scratch"
    for run in children:
        assert epochs_logged(client, run.info.run_id) == list(range(1, epochs + 1)), "each epoch logged once"


def test_tracking_server_restarted_mid_run(restartable_mlflow, synth_root, tmp_path) -> None:
    epochs = 5
    file = ablation(tmp_path / "restart.yaml", synth_root, "restart", epochs, "  standard: {}")
    server = restartable_mlflow
    client = MlflowClient(server.url)
    worker = harness_run(file, server.url, tmp_path / "results", HARNESS_TRACKING_RETRY_S="120")
    try:
        wait_for_epoch(client, "restart", 1, worker)
        with frozen(worker):
            stopped = time.monotonic()
            server.stop()
        server.start()  # the server's own start-up (about 10 s on 2 loaded cores) is the outage
        outage = time.monotonic() - stopped
        output = worker.communicate(timeout=240)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, output[-3000:]
    assert outage >= 3, f"the server was down {outage:.1f} s only"
    assert "does not answer" in output, "the worker met the outage and waited for the server"

    runs = all_runs(client, "restart")
    assert [r for r in runs if r.info.status == "RUNNING"] == [], "never left RUNNING"
    children = [r for r in runs if r.data.tags.get(names.ROLE) == names.CHILD]
    assert [(r.info.run_name, r.info.status) for r in children] == [("standard", "FINISHED")]
    assert epochs_logged(client, children[0].info.run_id) == list(range(1, epochs + 1)), "every epoch once"


def test_tracking_server_down_past_the_retry_window(restartable_mlflow, synth_root, tmp_path) -> None:
    """The worker gives up in one line; the run it left RUNNING is taken over by the next `harness run`,
    which resumes it into the same MLflow run: FINISHED once, every epoch once, nothing left RUNNING."""
    epochs = 6
    file = ablation(tmp_path / "gone.yaml", synth_root, "gone", epochs, "  standard: {}")
    server = restartable_mlflow
    client = MlflowClient(server.url)
    results = tmp_path / "results"
    worker = harness_run(file, server.url, results, HARNESS_TRACKING_RETRY_S="2")
    try:
        wait_for_epoch(client, "gone", 1, worker)
        with frozen(worker):
            server.stop()
        output = worker.communicate(timeout=120)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "did not answer for" in output and "what was left RUNNING there is resumed" in output, output[-3000:]

    server.start()
    again = harness_run(file, server.url, results)
    output = again.communicate(timeout=240)[0]
    assert again.returncode == 0, output[-3000:]

    runs = all_runs(client, "gone")
    assert [r for r in runs if r.info.status == "RUNNING"] == [], "never left RUNNING"
    children = [r for r in runs if r.data.tags.get(names.ROLE) == names.CHILD]
    assert [(r.info.run_name, r.info.status) for r in children] == [("standard", "FINISHED")], "one run, resumed"
    assert int(children[0].data.tags.get(names.RESUMED_FROM_EPOCH, "0")) >= 1, output[-3000:]
    assert epochs_logged(client, children[0].info.run_id) == list(range(1, epochs + 1)), "every epoch once"
