"""What optuna-dashboard reads (the study's metric name) and `harness tune --timeout`."""

from __future__ import annotations

from pathlib import Path

import optuna

from harness.cli import main

FILE = """
name: timed
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
search:
  lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
  objective: {{metric: val_map, direction: maximize}}
  n_trials: 3
  sampler: {{name: tpe, seed: 0}}
"""


def test_studies_name_their_metric_and_timeout_stops_new_trials(tmp_path: Path, synth_root: Path, capsys):
    file = tmp_path / "timed.yaml"
    file.write_text(FILE.format(root=synth_root))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    base = ["tune", str(file), "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--results-dir", str(tmp_path / "results")]
    assert main([*base, "--n-trials", "1"]) == 0
    study = optuna.load_study(study_name="timed.standard", storage=storage)
    assert study.metric_names == ["val_map"] and len(study.trials) == 1
    capsys.readouterr()

    assert main([*base, "--timeout", "0.001"]) == 0  # the study has a complete trial: not empty
    assert len(optuna.load_study(study_name="timed.standard", storage=storage).trials) == 1
    assert "--timeout 0.001s reached: timed.standard short of target" in capsys.readouterr().out


def test_timeout_must_be_positive(tmp_path: Path, synth_root: Path, capsys):
    file = tmp_path / "timed.yaml"
    file.write_text(FILE.format(root=synth_root))
    assert main(["tune", str(file), "--timeout", "0"]) == 2
    assert "--timeout 0: give a positive number of seconds" in capsys.readouterr().err
