"""docs/scaling.md's Optuna recipe on real servers: `harness tune` workers sharing one study in PostgreSQL,
logging to an MLflow tracking server, and a stopped database reported in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

SEARCH = """
search:
  lr: {low: 1.0e-4, high: 1.0e-1, log: true}
  objective: {metric: val_loss, direction: minimize}
  n_trials: 4
  sampler: {name: tpe, seed: 0}
  pruner: none
"""


def ablation(path: Path, root: Path, name: str) -> Path:
    path.write_text(f"""
name: {name}
baseline: standard
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3, width: 0.5}}
  train: {{epochs: 1, batch_size: 16, lr: 0.003}}
  profile: {{enabled: false}}
variants:
  standard: {{model: {{deform_layers: none}}}}
grid:
  seed: [0]
{SEARCH}
""")
    return path


def tune(file: Path, storage: str, uri: str, results: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "harness", "tune", str(file), "--storage", storage, "--tracking-uri", uri,
               "--results-dir", str(results), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def test_two_tune_workers_share_a_postgres_study(postgres, mlflow_server, synth_root, tmp_path) -> None:
    storage = postgres.database("optuna")
    file = ablation(tmp_path / "pgtune.yaml", synth_root, "pgtune")
    workers = [tune(file, storage, mlflow_server.url, tmp_path / f"results-{i}") for i in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[0][-2000:] + o[1][-2000:] for o in outputs]

    found = optuna.load_study(study_name="pgtune.standard", storage=storage).get_trials(deepcopy=False)
    assert sorted(t.number for t in found) == [0, 1, 2, 3], "exactly the trials asked for, none twice"
    assert len({t.user_attrs["harness.pid"] for t in found}) == 2, "both workers ran trials"
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("pgtune")
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")
    assert sorted(int(r.data.tags["harness.trial_number"]) for r in runs) == [0, 1, 2, 3], "one run per trial"
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    by_id = {r.info.run_id: r for r in runs}
    for t in found:
        run = by_id[t.user_attrs["harness.mlflow_run_id"]]
        assert (run.info.status, run.data.tags["harness.trial_state"]) == (status[t.state.name], t.state.name)


def test_stopped_postgres_is_one_line_and_exit_2(postgres, synth_root, tmp_path) -> None:
    storage = postgres.database("optuna_down")
    file = ablation(tmp_path / "down.yaml", synth_root, "down")
    postgres.stop()
    try:
        worker = tune(file, storage, f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "results")
        out, err = worker.communicate(timeout=120)
    finally:
        postgres.start()
    assert worker.returncode == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out + err, err
    assert "cannot open Optuna storage postgresql://postgres@127.0.0.1" in lines[0] and "server running" in lines[0]
