"""One tiny real `harness run` (sqlite MLflow store, generated data) shared by the tracking tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cli import main

DESCRIPTION = "Tiny ablation: does a deformable first layer change anything?"


@dataclass
class TinyRun:
    uri: str
    results: Path
    file: Path
    root: Path


def write_ablation(directory: Path, data_root: Path, extra_train: str = "") -> Path:
    """A two-variant, one-epoch ablation over `data_root` with a profiling window."""
    path = directory / "tiny.yaml"
    path.write_text(f"""
name: tiny
description: "{DESCRIPTION}"
baseline: standard
base:
  data: {{source: coco, root: "{data_root}", image_size: 32}}
  model: {{arch: small3, width: 0.5}}
  train: {{epochs: 1, batch_size: 16, lr: 0.003{extra_train}}}
  profile: {{wait: 0, warmup: 1, active: 1}}
variants:
  standard: {{model: {{deform_layers: none}}}}
  deform: {{model: {{deform_layers: "first:1", offset_channels: shared}}}}
grid:
  seed: [0]
""")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny")
    uri = f"sqlite:///{root}/store/mlflow.db"
    file = write_ablation(root, synth_root)
    results = root / "results"
    assert main(["run", str(file), "--tracking-uri", uri, "--results-dir", str(results)]) == 0
    return TinyRun(uri, results, file, root)
