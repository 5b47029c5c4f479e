"""A tiny real `harness run` (one variant, one epoch, profiled) for the commands that read a store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main

DESCRIPTION = "Tiny ablation for the command-line tests: standard against deformable."


@dataclass
class TinyRun:
    uri: str
    results: Path
    file: Path
    run_id: str


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> TinyRun:
    root = tmp_path_factory.mktemp("cli-tiny")
    file = root / "tiny.yaml"
    file.write_text(f"""
name: tiny
description: "{DESCRIPTION}"
baseline: standard
base:
  data: {{source: coco, root: "{synth_root}", image_size: 32}}
  model: {{arch: small3, width: 0.5}}
  train: {{epochs: 1, batch_size: 16, lr: 0.003}}
  profile: {{wait: 0, warmup: 1, active: 1}}
variants:
  standard: {{model: {{deform_layers: none}}}}
  deform: {{model: {{deform_layers: "first:1", offset_channels: shared}}}}
grid:
  seed: [0]
""")
    uri = f"sqlite:///{root}/store/mlflow.db"
    results = root / "results"
    assert main(["run", str(file), "--tracking-uri", uri, "--results-dir", str(results)]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'child'",
                              order_by=["attributes.run_name ASC"])
    return TinyRun(uri, results, file, runs[0].info.run_id)
