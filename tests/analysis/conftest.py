"""A tiny trained ablation shared by the analysis tests: synthetic data, small3 at 32 px, one epoch, real sqlite MLflow.

Variants: standard (baseline), deform (first:2, per-tap offsets) and shared (first:2, one offset for all taps).
`harness eval tiny_analysis` has already run on it when the fixture is handed out.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

EXPERIMENT = "tiny_analysis"


@dataclass
class TrainedAblation:
    uri: str
    results: Path
    file: Path
    experiment: str = EXPERIMENT


def write_ablation(
    path: Path, root: Path, name: str = EXPERIMENT, variants: str | None = None, baseline: str = "standard"
) -> Path:
    variants = variants or """\
  standard: {model: {deform_layers: none}}
  deform: {model: {deform_layers: "first:2", offset_channels: per_tap}}
  shared: {model: {deform_layers: "first:2", offset_channels: shared}}
"""
    path.write_text(f"""
name: {name}
description: analysis end-to-end test
baseline: {baseline}
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3, width: 0.5}}
  train: {{epochs: 1, batch_size: 16, lr: 0.003, offset_lr_mult: 3.0}}
variants:
{variants}grid:
  seed: [0]
""")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> TrainedAblation:
    from harness.cli import main

    tmp = tmp_path_factory.mktemp("analysis")
    uri = f"sqlite:///{tmp}/mlflow.db"
    results = tmp / "results"
    file = write_ablation(tmp / "tiny.yaml", synth_root)
    args = ["--tracking-uri", uri, "--results-dir", str(results)]
    assert main(["run", str(file), "--no-profile", *args]) == 0
    assert main(["eval", EXPERIMENT, "--erf-images", "16", "--sampling-images", "2", *args]) == 0
    yield TrainedAblation(uri, results, file)
    shutil.rmtree(tmp, ignore_errors=True)
