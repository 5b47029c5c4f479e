"""`harness run --executor ray` on the tracking server (PostgreSQL back end): 2 local Ray workers, a worker
killed mid-run whose results directory is lost with it (no shared disk), retried in another worker
from the run's checkpoint artifact; every run FINISHED once, each epoch logged once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.checkpoints import checkpoint_path
from harness.planning import expand, load_ablation

pytest.importorskip("ray")

EPOCHS = 8


def _ablation(tmp_path: Path, root: Path) -> Path:
    file = tmp_path / "grid.yaml"
    file.write_text(f"""
name: raygrid
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3}}
  train: {{epochs: {EPOCHS}, batch_size: 8, lr: 0.003, threads: 1}}
  profile: {{enabled: false}}
variants:
  standard: {{model: {{deform_layers: none}}}}
  deform: {{model: {{deform_layers: "first:1"}}}}
""")
    return file


def _children(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("raygrid")
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], "tags.`harness.role` = 'child'")


def test_ray_workers_without_a_shared_disk_resume_a_killed_run_from_its_artifact(mlflow_server, synth_root, tmp_path):
    uri = mlflow_server.url
    results = tmp_path / "results"
    file = _ablation(tmp_path, synth_root)
    victim = next(r for r in expand(load_ablation(file)) if r.variant == "deform")
    checkpoint = checkpoint_path(results, "raygrid", victim.config_hash)
    command = [sys.executable, "-m", "harness", "run", str(file), "--executor", "ray", "--tracking-uri", uri,
               "--results-dir", str(results)]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    killed, worker = None, None
    deadline = time.time() + 240
    while worker is None and time.time() < deadline and driver.poll() is None:
        client, children = _children(uri)
        worker = next((c for c in children if c.info.run_name == "deform" and c.info.status == "RUNNING"), None)
        time.sleep(0.1)
    while worker is not None and killed is None and time.time() < deadline and driver.poll() is None:
        # the checkpoint artifact is uploaded before an epoch's metrics: one logged epoch means one upload
        if client.get_metric_history(worker.info.run_id, "val/map"):
            killed = int(worker.data.tags["harness.pid"])
            os.kill(killed, signal.SIGKILL)
            checkpoint.unlink(missing_ok=True)  # the worker's disk goes with it: only the artifact is left
        time.sleep(0.02)
    output, _ = driver.communicate(timeout=300)
    assert killed is not None, "never saw the deform run's worker mid-training:\n" + output[-3000:]
    assert driver.returncode == 0, output[-3000:]

    client, children = _children(uri)
    assert sorted(c.info.run_name for c in children) == ["deform", "standard"], "each run exactly once"
    assert all(c.info.status == "FINISHED" for c in children)
    deform = next(c for c in children if c.info.run_name == "deform")
    assert int(deform.data.tags["harness.pid"]) != killed, "the retry ran in another worker"
    assert deform.data.tags["harness.executor"].startswith("ray")
    assert int(deform.data.tags.get("harness.resumed_from_epoch", "0")) >= 1, "resumed, not trained again"
    steps = sorted(m.step for m in client.get_metric_history(deform.info.run_id, "val/map"))
    assert steps == list(range(1, EPOCHS + 1)), "each epoch logged once"
    assert not client.search_runs([deform.info.experiment_id], "attributes.status = 'RUNNING'"), "nothing RUNNING"
