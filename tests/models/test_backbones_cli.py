"""ResNet-18 and a user network through the CLI on coco-mini: list, one training epoch, `harness eval`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.tracking import names

USER_NET = textwrap.dedent("""
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
            self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = F.relu(self.stem(x))
            for block in self.blocks:
                x = x + F.relu(block(x))
            return self.fc(F.relu(self.down(x)).mean((2, 3)))

    def build(num_classes):
        return Net(num_classes)
""")


def _ablation(path: Path, root: Path, name: str, model: str, variants: str) -> Path:
    lines = [
        f"name: {name}", "description: backbone end-to-end test", "baseline: plain", "base:",
        f'  data: {{source: coco, root: "{root}", image_size: 32, train_size: 48, val_size: 32}}',
        f"  model: {model}", "  train: {epochs: 1, batch_size: 16, lr: 0.003}", "variants:",
        *[f"  {line}" for line in variants.strip().splitlines()], "grid:", "  seed: [0]",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _metrics(uri: str, experiment: str) -> dict[str, dict[str, float]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'child'")
    assert all(r.info.status == "FINISHED" for r in runs)
    return {r.data.tags["harness.variant"]: r.data.metrics for r in runs}


@pytest.mark.slow
def test_resnet18_c3_c5_trains_one_epoch_and_evaluates(coco_mini_root: Path, tmp_path: Path, capsys) -> None:
    file = _ablation(tmp_path / "r.yaml", coco_mini_root, "resnet_e2e", "{arch: resnet18}",
                     'plain: {model: {deform_layers: none}}\nc3-c5: {model: {deform_layers: c3-c5}}\n')
    args = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--results-dir", str(tmp_path / "results")]
    assert main(["run", str(file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in ("12: layer2×4", "layer3×4", "layer4×4", "resnet18", "GFLOPs"))
    assert main(["run", str(file), "--no-profile", *args]) == 0
    assert main(["eval", "resnet_e2e", "--erf-images", "4", "--sampling-images", "1", "--only",
                 "offsets,sampling,erf", *args]) == 0
    metrics = _metrics(f"sqlite:///{tmp_path}/mlflow.db", "resnet_e2e")
    assert metrics["c3-c5"][names.PARAMS] > metrics["plain"][names.PARAMS] > 11e6
    deform = metrics["c3-c5"]
    assert "offset/conv5/mean_abs" in deform and "offset/conv19/mean_abs" in deform  # layer2.0.conv1, layer4.1.conv2
    assert "offset/conv7/mean_abs" not in deform  # layer2.0.downsample.0 stays a 1×1 conv
    assert deform["erf/layer"] == 19 and deform["erf/rms_radius_px"] > 0


def test_user_factory_by_module_name_trains_and_evaluates(
    coco_mini_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (tmp_path / "harness_e2e_user_net.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    file = _ablation(tmp_path / "u.yaml", coco_mini_root, "user_e2e", '{arch: "harness_e2e_user_net:build"}',
                     'plain: {model: {deform_modules: []}}\nblocks: {model: {deform_modules: ["blocks.*"]}}\n')
    args = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--results-dir", str(tmp_path / "results")]
    assert main(["list", str(file)]) == 0
    assert "2: blocks.0, blocks.1" in capsys.readouterr().out
    assert main(["run", str(file), "--no-profile", *args]) == 0
    assert main(["eval", "user_e2e", "--erf-images", "4", "--sampling-images", "1", *args]) == 0
    deform = _metrics(f"sqlite:///{tmp_path}/mlflow.db", "user_e2e")["blocks"]
    assert "offset/conv1/mean_abs" in deform and "offset/conv2/mean_abs" in deform
    assert "robust/rotation/mean_map_drop" in deform and deform["erf/layer"] == 3


def test_a_pattern_matching_nothing_stops_the_plan(tmp_path: Path, capsys) -> None:
    file = _ablation(tmp_path / "bad.yaml", tmp_path, "bad", "{arch: resnet18}",
                     'plain: {model: {deform_modules: ["layer5.*"]}}\n')
    assert main(["list", str(file)]) == 2
    err = capsys.readouterr().err
    assert "deform_modules pattern 'layer5.*': it matches no module" in err and len(err.strip().splitlines()) == 1
