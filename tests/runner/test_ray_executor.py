"""`harness run --executor ray` on a local Ray instance (2 CPUs) with a sqlite store."""

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


def _ablation(tmp_path: Path, root: Path, epochs: int) -> Path:
    file = tmp_path / "grid.yaml"
    file.write_text(f"""
name: raygrid
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3}}
  train: {{epochs: {epochs}, batch_size: 8, lr: 0.003, threads: 1}}
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


def test_ray_runs_every_run_once_and_retries_a_killed_worker(tmp_path, synth_root):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = tmp_path / "results"
    file = _ablation(tmp_path, synth_root, epochs=12)
    runs = expand(load_ablation(file))
    victim = next(r for r in runs if r.variant == "deform")
    checkpoint = checkpoint_path(results, "raygrid", victim.config_hash)
    command = [sys.executable, "-m", "harness", "run", str(file), "--executor", "ray", "--tracking-uri", uri,
               "--results-dir", str(results)]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    killed = None
    deadline = time.time() + 180
    while killed is None and time.time() < deadline and driver.poll() is None:
        if checkpoint.exists():
            _, children = _children(uri)
            worker = next((c for c in children if c.info.run_name.startswith("deform")
                           and c.info.status == "RUNNING"), None)
            if worker is not None:
                killed = int(worker.data.tags["harness.pid"])
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    output, _ = driver.communicate(timeout=300)
    assert killed is not None, "never saw the deform run's worker mid-training:\n" + output[-3000:]
    assert driver.returncode == 0, output[-3000:]

    client, children = _children(uri)
    assert sorted(c.info.run_name for c in children) == ["deform", "standard"], "each run exactly once"
    assert all(c.info.status == "FINISHED" for c in children)
    deform = next(c for c in children if c.info.run_name == "deform")
    assert int(deform.data.tags["harness.pid"]) != killed, "the retry ran in another worker"
    assert int(deform.data.tags.get("harness.resumed_from_epoch", "0")) >= 1
    steps = sorted(m.step for m in client.get_metric_history(deform.info.run_id, "val/map"))
    assert steps == list(range(1, 13))

    # a repeated invocation trains nothing
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "skipping 2 run(s)" in again.stdout
    assert len(_children(uri)[1]) == 2
