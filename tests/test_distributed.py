"""Data-parallel training: `harness run --nproc 2` under torchrun with the gloo backend on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from mlflow.tracking import MlflowClient

from harness.data import BatchLoader


def test_loader_shards_cover_every_sample_once_per_epoch():
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(10, dtype=torch.uint8)
    targets = torch.zeros(10, 2)
    seen = []
    for rank in range(3):
        g = torch.Generator().manual_seed(7)
        loader = BatchLoader(images, targets, batch_size=2, hflip=False, generator=g, rank=rank, world_size=3,
                             mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
        assert len(loader) == 2  # ceil(10 / 3) = 4 samples per rank, 2 batches
        seen += [int(v) for x, _ in loader for v in x[:, 0, 0, 0].round()]
    assert sorted(set(seen)) == list(range(10))
    assert len(seen) == 12  # padded with 2 repeats, like DistributedSampler


def test_two_process_gloo_run_logs_once(tmp_path, synth_root):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    file = tmp_path / "ddp.yaml"
    file.write_text(f"""
name: ddp
base:
  data: {{source: coco, root: "{synth_root}", image_size: 32}}
  model: {{arch: small3, deform_layers: "first:1"}}
  train: {{epochs: 2, batch_size: 16, lr: 0.003}}
variants:
  deform: {{}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(file), "--tracking-uri", uri, "--results-dir",
         str(tmp_path / "results"), "--nproc", "2", "--no-profile"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'child'")
    assert len(runs) == 1, "only rank 0 logs"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["harness.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_map")] == [1, 2]
    assert run.data.metrics["train_images"] == 64
    assert 0 <= run.data.metrics["best_val_map"] <= 1
