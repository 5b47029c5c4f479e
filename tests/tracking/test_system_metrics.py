"""`train.system_metrics: true` samples MLflow's system metrics into the child run; off (the default), none."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.tracking import names

from .conftest import TinyRun, write_ablation


def _child(uri: str, variant: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{names.VARIANT}` = '{variant}'")
    assert len(runs) == 1
    return runs[0]


def test_system_metrics_logged_only_when_asked(tiny_run: TinyRun, tmp_path: Path, synth_root: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # samples while it trains
    file = write_ablation(tmp_path, synth_root, extra_train=", system_metrics: true")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", str(file), "--tracking-uri", uri, "--results-dir", str(tmp_path / "results"), "--only", "standard"]
    assert main(args) == 0
    with_system = _child(uri, "standard")
    system = [k for k in with_system.data.metrics if k.startswith(names.SYSTEM_PREFIX)]
    assert f"{names.SYSTEM_PREFIX}cpu_utilization_percentage" in system, sorted(with_system.data.metrics)
    assert with_system.info.status == "FINISHED" and with_system.data.params["train.system_metrics"] == "True"
    without = _child(tiny_run.uri, "standard")
    assert not [k for k in without.data.metrics if k.startswith(names.SYSTEM_PREFIX)]
    # an execution key: the run's identity (config hash) is the one it has without system metrics
    assert with_system.data.tags[names.CONFIG_HASH] == without.data.tags[names.CONFIG_HASH]
