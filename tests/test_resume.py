"""Resume restores the exact training state: a run interrupted after epoch k and resumed is bit-identical
to an uninterrupted one (metrics, weights, optimizer, schedule, RNG and data order), on the CPU.

A resume that silently restarted from fresh weights, a fresh optimizer, the first epoch's data order or
a reseeded RNG would still pass every bookkeeping test (epochs, statuses, step counts); these would not.
Both tests also check that a resume *happened* (from the expected epoch): a run that ignored its
checkpoint and retrained from scratch would be bit-identical too, and must not pass for a resume.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.checkpoints import load_checkpoint, saved_epoch
from harness.cli import main
from harness.config import RunConfig
from harness.data import prepare_data
from harness.planning import expand, load_ablation, parse_set
from harness.train import fit

TIMING_KEYS = {"cost/epoch_time_s", "cost/train_images_per_s", "cost/data_wait_s"}
CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """One intra-op thread (reductions in a fixed order); the previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """`a` and `b` are the same nested data: tensors bit-identical (torch.equal, same dtype and shape),
    floats exactly equal (NaN equals NaN), everything else ==. The message names the first difference."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{list(a.shape)}, {b.dtype}{list(b.shape)}"
        if not torch.equal(a, b):
            delta = (a.double() - b.double()).abs().max().item()
            raise AssertionError(f"{where}: tensors differ (max |Δ| {delta:.3g})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}" if where else str(key))
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


# --- 1. fit itself: 3 epochs vs 1 epoch + resume to 3 -------------------------------------------------------


@pytest.fixture(scope="module")
def data(synth_root, tmp_path_factory):
    return prepare_data(synth_root, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))


def resume_config(epochs: int) -> RunConfig:
    """Everything a resume must carry over matters here: deformable layers (offset parameter group),
    dropout (global torch RNG), shuffling, hflip and random-resized-crop (the loader's generator),
    a stepped LR schedule (scheduler + optimizer lr; step_size 2, so a scheduler restarted at resume would
    miss the decay after epoch 2), Adam's moments and step counts."""
    return RunConfig.model_validate({
        "seed": 3,
        "data": {"image_size": 32, "hflip": True, "random_resized_crop": [0.5, 1.0]},
        "model": {"arch": "unet_encoder", "width": 0.25, "deform_layers": "all", "offset_channels": "per_tap",
                  "modulated": True, "dropout": 0.2},
        "train": {"epochs": epochs, "batch_size": 16, "optimizer": "adam", "schedule": "step", "step_size": 2,
                  "gamma": 0.5, "offset_lr_mult": 0.5, "checkpoint": True},
        "profile": {"enabled": False},
    })


def test_fit_resumed_after_epoch_1_is_bit_identical_to_uninterrupted(data, tmp_path, one_thread):
    straight_ckpt, resumed_ckpt = tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt"
    straight = fit(resume_config(3), data, lr=3e-3, device=CPU, checkpoint_path=straight_ckpt)

    first = fit(resume_config(1), data, lr=3e-3, device=CPU, checkpoint_path=resumed_ckpt)
    assert first.resumed_from == 0 and saved_epoch(resumed_ckpt) == 1
    resumed = fit(resume_config(3), data, lr=3e-3, device=CPU, checkpoint_path=resumed_ckpt)
    assert resumed.resumed_from == 1, "the second fit did not resume from its epoch-1 checkpoint"

    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    assert [h["train/lr"] for h in straight.history] == [3e-3, 3e-3, 1.5e-3]  # the schedule really steps
    assert_identical(without_timing(resumed.history), without_timing(straight.history), "history")

    a, b = load_checkpoint(straight_ckpt), load_checkpoint(resumed_ckpt)
    assert a["epoch"] == b["epoch"] == 3
    assert_identical(b["model"], a["model"], "model")
    assert_identical(b["optimizer"], a["optimizer"], "optimizer")
    assert_identical(b["scheduler"], a["scheduler"], "scheduler")
    assert_identical(b["generator"], a["generator"], "generator")
    assert_identical(b["torch_rng"], a["torch_rng"], "torch_rng")
    # the selected (best val_map) epoch's weights survive the resume, and so does what they report
    assert b["selected_epoch"] == a["selected_epoch"] == straight.summary["best/epoch"]
    assert_identical(b["selected_model"], a["selected_model"], "selected_model")
    held_out = [k for k in straight.summary if k.startswith(("best/selected_", "chance/", "val/map_"))]
    assert_identical({k: resumed.summary[k] for k in held_out}, {k: straight.summary[k] for k in held_out})
    assert_identical(resumed.per_class_ap, straight.per_class_ap, "per_class_ap")


# --- 2. harness run, SIGKILLed mid-run and resumed, vs an uninterrupted harness run ------------------------------

EPOCHS = 3
COMPARED_METRICS = ("val/map", "val/loss", "train/loss", "train/lr")


def resume_ablation(tmp_path: Path) -> Path:
    # ~1-2 s per epoch on a loaded 2-core machine: the kill lands after epoch 1 and well before the end.
    path = tmp_path / "resume.yaml"
    path.write_text(f"""
name: resume_exact
baseline: deform
base:
  seed: 5
  data:
    source: synthetic
    image_size: 32
    synthetic: {{n_train: 320, n_val: 64, seed: 1}}
    hflip: true
    random_resized_crop: [0.5, 1.0]
  model: {{arch: unet_encoder, width: 0.25, dropout: 0.2}}
  train: {{epochs: {EPOCHS}, batch_size: 16, optimizer: sgd, momentum: 0.9, lr: 0.02, schedule: cosine, threads: 1}}
variants:
  deform: {{model: {{deform_layers: "first:2", offset_channels: per_tap}}}}
""")
    return path


def find_last(results: Path, config_hash: str) -> Path | None:
    """The run's last.pt under `results` (`checkpoints/<hash>/last.pt`, or nested deeper, e.g. per ablation)."""
    return next(iter(sorted(results.glob(f"checkpoints/**/{config_hash}/last.pt"))), None)


def run_args(file: Path, uri: str, results: Path) -> list[str]:
    return ["run", str(file), "--tracking-uri", uri, "--results-dir", str(results), "--no-profile", "--device", "cpu"]


def child_runs(uri: str) -> tuple[MlflowClient, list[Any]]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume_exact")
    return client, client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'child'")


def metric_histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in COMPARED_METRICS}


def test_harness_run_sigkilled_and_resumed_is_bit_identical_to_uninterrupted(tmp_path):
    file = resume_ablation(tmp_path)
    (planned,) = expand(load_ablation(file), parse_set([]))
    threads = torch.get_num_threads()  # train.threads=1 sets it in this process too
    try:
        # the reference: uninterrupted, in this process
        ref_uri, ref_results = f"sqlite:///{tmp_path}/ref.db", tmp_path / "ref"
        assert main(run_args(file, ref_uri, ref_results)) == 0

        # the interrupted run: its own process, SIGKILLed once its checkpoint holds epoch 1
        uri, results = f"sqlite:///{tmp_path}/resumed.db", tmp_path / "resumed"
        log = tmp_path / "killed.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "harness", *run_args(file, uri, results)],
                                    stdout=out, stderr=subprocess.STDOUT)
        checkpoint, killed_at, deadline = None, 0, time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                checkpoint = checkpoint or find_last(results, planned.config_hash)
                if checkpoint is not None and (killed_at := saved_epoch(checkpoint)) >= 1:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None and not killed_at:
                proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL and checkpoint is not None, (
            f"the run was not killed mid-run (exit {proc.returncode}, checkpoint {checkpoint}, epoch {killed_at}): "
            f"make an epoch slower\n{log.read_text(errors='replace')[-2000:]}")
        killed_at = saved_epoch(checkpoint)  # an epoch may have been saved between the poll and the kill
        assert 1 <= killed_at < EPOCHS, f"killed with checkpoint epoch {killed_at}: nothing left to resume"
        _, before = child_runs(uri)
        assert [r.info.status for r in before] == ["RUNNING"]  # left behind by the killed process

        # resume, in this process
        assert main(run_args(file, uri, results)) == 0
    finally:
        torch.set_num_threads(threads)

    client, resumed_runs = child_runs(uri)
    ref_client, ref_runs = child_runs(ref_uri)
    assert len(resumed_runs) == 1, "a resumed run continues its own MLflow child run"
    (resumed,), (ref,) = resumed_runs, ref_runs
    assert resumed.info.run_id == before[0].info.run_id and resumed.info.status == ref.info.status == "FINISHED"
    assert resumed.data.tags["harness.config_hash"] == ref.data.tags["harness.config_hash"] == planned.config_hash
    assert resumed.data.tags.get("harness.resumed_from_epoch") == str(killed_at), "the rerun did not resume"
    assert "harness.resumed_from_epoch" not in ref.data.tags

    got, want = metric_histories(client, resumed.info.run_id), metric_histories(ref_client, ref.info.run_id)
    assert [step for step, _ in want["val/map"]] == list(range(1, EPOCHS + 1))
    lrs = [lr for _, lr in want["train/lr"]]
    assert lrs == sorted(set(lrs), reverse=True), f"the cosine schedule does not decay: {lrs}"
    assert got == want, f"per-epoch metrics differ after resuming from epoch {killed_at}"

    ref_checkpoint = find_last(ref_results, planned.config_hash)
    assert ref_checkpoint is not None and ref_checkpoint.relative_to(ref_results) == checkpoint.relative_to(results)
    a, b = load_checkpoint(ref_checkpoint), load_checkpoint(checkpoint)
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert_identical(b["model"], a["model"], "model")
    assert_identical(b["optimizer"], a["optimizer"], "optimizer")
    assert_identical(without_timing(b["history"]), without_timing(a["history"]), "history")
