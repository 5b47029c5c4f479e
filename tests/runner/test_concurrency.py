"""Two `harness run` processes on one ablation and one store: every run trained once, nothing lost,
nothing left RUNNING, no run's metrics written by two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.planning import expand, load_ablation

EPOCHS = 2


def _ablation(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "duo.yaml"
    path.write_text(f"""
name: duo
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3, width: 0.5}}
  train: {{epochs: {EPOCHS}, batch_size: 16, lr: 0.003, threads: 1}}
variants:
  standard: {{model: {{deform_layers: none}}}}
  first: {{model: {{deform_layers: "first:1"}}}}
  all: {{model: {{deform_layers: all}}}}
grid:
  seed: [0, 1]
""")
    return path


def _start(file: Path, uri: str, results: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "harness", "run", str(file), "--tracking-uri", uri, "--results-dir",
               str(results), "--no-profile", "--device", "cpu"]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _audit(uri: str, planned: set[str]) -> None:
    """Runs duplicated 0, lost 0, left RUNNING 0, metrics interleaved 0."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("duo")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'child'")
    hashes = [r.data.tags["harness.config_hash"] for r in runs]
    assert sorted(hashes) == sorted(planned), "each planned run exactly once (none duplicated, none lost)"
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    everything = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert not everything, "nothing left RUNNING"
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/map")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), f"{run.info.run_name}: val_map steps {steps}"
        claims = [k for k in run.data.params if k.startswith("harness.claim.")]
        assert claims == ["harness.claim.0"], f"{run.info.run_name} was taken over: {claims}"


def test_two_processes_started_together_on_a_new_store(tmp_path: Path, synth_root: Path) -> None:
    file = _ablation(tmp_path, synth_root)
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    planned = {r.config_hash for r in expand(load_ablation(file))}
    procs = [_start(file, uri, tmp_path / f"results{i}", tmp_path / f"log{i}.txt") for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"log{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert all("Traceback" not in log for log in logs), logs
    _audit(uri, planned)


def test_a_later_process_leaves_a_live_run_alone(tmp_path: Path, synth_root: Path) -> None:
    file = _ablation(tmp_path, synth_root)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = tmp_path / "results"  # one results directory, as two workers on one machine would share
    planned = {r.config_hash for r in expand(load_ablation(file))}
    first = _start(file, uri, results, tmp_path / "first.txt")
    client = MlflowClient(uri)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:  # wait until the first owns a RUNNING run
        exp = client.get_experiment_by_name("duo") if Path(f"{tmp_path}/mlflow.db").exists() else None
        if exp and client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                      "tags.`harness.role` = 'child'"):
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first process ended before the second started"
    second = _start(file, uri, results, tmp_path / "second.txt")
    codes = [first.wait(timeout=300), second.wait(timeout=300)]
    second_log = (tmp_path / "second.txt").read_text()
    assert codes == [0, 0], [(tmp_path / "first.txt").read_text(), second_log]
    assert "running in another process" in second_log or "FINISHED" in second_log, second_log
    _audit(uri, planned)
