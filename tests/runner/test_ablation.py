"""End to end: `harness run` on tiny data with a real sqlite MLflow store; resume after SIGKILL."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.checkpoints import checkpoint_path
from harness.cli import main
from harness.ops import kernel_summary
from harness.planning import expand, load_ablation, parse_set

EPOCH_METRICS = [
    "train/loss", "val/loss", "val/map", "val/micro_precision", "val/micro_recall", "val/micro_f1",
    "val/macro_precision", "val/macro_recall", "val/macro_f1", "val/cp", "val/cr", "val/cf1",
    "val/op", "val/or", "val/of1", "cost/epoch_time_s", "cost/train_images_per_s", "cost/data_wait_s", "train/lr",
]
RUN_METRICS = [
    "best/val/map", "final/val/map", "best/val/loss", "best/val/micro_f1", "cost/mean_epoch_time_s",
    "cost/mean_train_images_per_s", "cost/total_data_wait_s", "cost/peak_rss_mb", "cost/params",
    "cost/flops_per_image", "cost/profile_deform_share", "cost/profile_step_ms",
]


def ablation(tmp_path: Path, root: Path, epochs: int = 2, extra_variant: str = "", arch: str = "small3") -> Path:
    text = f"""
name: tiny
description: tiny end-to-end ablation
baseline: standard
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: {arch}, width: 0.5}}
  train: {{epochs: {epochs}, batch_size: 16, lr: 0.003}}
  profile: {{wait: 0, warmup: 1, active: 1}}
variants:
  standard: {{model: {{deform_layers: none}}}}
  deform: {{model: {{deform_layers: "first:1", offset_channels: shared}}}}
{extra_variant}
grid:
  seed: [0]
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def children(uri: str, experiment: str = "tiny"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'child'")
    return client, runs


def test_run_logs_everything_and_rerun_skips(tmp_path, synth_root, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    file = ablation(tmp_path, synth_root)
    args = ["run", str(file), "--tracking-uri", uri, "--results-dir", str(tmp_path / "results")]
    assert main(args) == 0
    client, runs = children(uri)
    assert sorted(r.info.run_name for r in runs) == ["deform/seed=0", "standard/seed=0"]
    parents = client.search_runs([runs[0].info.experiment_id], "tags.`harness.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key in ("harness.config_hash", "harness.git_commit", "harness.torch", "harness.device", "harness.host"):
            assert run.data.tags[key]
        assert run.data.tags["harness.dcn_kernel"] == kernel_summary(torch.device("cpu"))
        assert run.data.params["model.arch"] == "small3" and run.data.params["seed"] == "0"
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
        for key in RUN_METRICS:
            assert key in run.data.metrics, key
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "model_summary.txt", "profile"} <= artifacts
        table = client.download_artifacts(run.info.run_id, "profile/op_table.csv", str(tmp_path / run.info.run_id))
        assert Path(table).read_text().startswith("name,calls,self_cpu_ms")
        assert 0 <= run.data.metrics["best/val/map"] <= 1
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["deform/seed=0"].data.metrics["cost/profile_deform_share"] > 0
    assert by_name["standard/seed=0"].data.metrics["cost/profile_deform_share"] == 0
    assert by_name["standard/seed=0"].data.tags["harness.baseline"] == "true"
    assert list((tmp_path / "results" / "profiles").glob("*/*.pt.trace.json"))

    capsys.readouterr()
    assert main(args) == 0
    assert "skipping 2 run(s)" in capsys.readouterr().out
    _, again = children(uri)
    assert len(again) == 2


def test_a_diverged_run_fails_alone_and_exit_is_nonzero(tmp_path, synth_root, capsys):
    """A non-finite loss ends that run FAILED ("diverged at epoch N"); the grid goes on; nothing non-finite
    reaches the store as a number."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    file = ablation(tmp_path, synth_root, epochs=2, extra_variant="  broken: {train: {lr: 1.0e+12}}")
    code = main(["run", str(file), "--tracking-uri", uri, "--results-dir", str(tmp_path / "results"), "--no-profile"])
    assert code == 1
    assert "broken/seed=0" in capsys.readouterr().err
    client, runs = children(uri)
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"standard/seed=0": "FINISHED", "deform/seed=0": "FINISHED", "broken/seed=0": "FAILED"}
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert re.fullmatch(r"diverged at epoch 1: (train loss is (nan|inf) at step \d+|val loss is (nan|inf))",
                        failed.data.tags["harness.failure"]), failed.data.tags["harness.failure"]
    assert "traceback.txt" not in [a.path for a in client.list_artifacts(failed.info.run_id)]
    every = [m.value for r in runs for key in r.data.metrics for m in client.get_metric_history(r.info.run_id, key)]
    assert every and all(math.isfinite(v) for v in every)


def test_a_run_that_finishes_after_failing_loses_its_failure_tag(tmp_path, synth_root):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    file = ablation(tmp_path, synth_root, epochs=1)
    args = ["run", str(file), "--tracking-uri", uri, "--results-dir", str(tmp_path / "results"), "--no-profile"]
    assert main(args) == 0
    client, runs = children(uri)
    run = runs[0]
    client.set_tag(run.info.run_id, "harness.failure", "an earlier attempt failed")
    client.set_tag(run.info.run_id, "harness.stale", "marked KILLED by a later harness run")
    client.set_terminated(run.info.run_id, "FAILED")
    from harness.tracking.store import ChildRun

    ChildRun(client, run.info.run_id).finish()
    tags = client.get_run(run.info.run_id).data.tags
    assert "harness.failure" not in tags and "harness.stale" not in tags


@pytest.mark.parametrize(
    "args,message",
    [
        (["--only", "nothing"], "--only 'nothing' matches no run"),
        (["--set", "train.epochs"], "bad --set"),
        (["--set", "train.epochs=zero"], "train.epochs"),
        (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--set", "train.lr=.inf"], "train.lr: Input should be a finite number"),
        (["--set", "model.deform_layers=[99]", "--override-variants"], "indices [99] are outside 0..2 (small3)"),
        (["--set", "model.deform_layers=first:99", "--override-variants"], "the network has 3 conv layers"),
        (["--set", "model.deform_layers=bogus", "--override-variants"], "'bogus' is not one of none, all"),
        (["--set", "model.deform_layers=first:1"], "would replace what variant 'standard' sets"),
        (["--set", f"grid.seed={list(range(300))}"], "expands to 600 runs, more than 256"),
        (["--set", "train.lr={from_study: missing}"], "no Optuna"),
        (["--tracking-uri", "file:///{tmp}/mlruns"], "MLflow's file store takes no new runs"),
        (["--results-dir", "{tmp}/tiny.yaml/results"], "--results-dir: cannot create"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_logs_nothing(tmp_path, synth_root, capsys, args, message, harness_env):
    harness_env(optuna_storage=f"sqlite:///{tmp_path}/optuna.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    file = ablation(tmp_path, synth_root)
    full = ["run", str(file), *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    if "--tracking-uri" not in args:
        full += ["--tracking-uri", uri]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or message in err.strip().splitlines()[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing logged, no store, no results"


@pytest.mark.parametrize("missing", ["root", "annotations"])
def test_missing_data_is_one_line_exit_2_before_anything_is_logged(tmp_path, capsys, missing):
    root = tmp_path / "coco"
    if missing == "annotations":
        (root / "train2017").mkdir(parents=True)
    file = ablation(tmp_path, root)
    code = main(["run", str(file), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--results-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert ("data root not found" if missing == "root" else "annotation file not found") in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.db").exists()


def test_sigkill_mid_epoch_resumes_and_redoes_no_finished_run(tmp_path, synth_root):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = tmp_path / "results"
    file = ablation(tmp_path, synth_root, epochs=8)
    runs = expand(load_ablation(file), parse_set([]))
    deform_ckpt = checkpoint_path(results, "tiny", runs[1].config_hash)
    command = [sys.executable, "-m", "harness", "run", str(file), "--tracking-uri", uri,
               "--results-dir", str(results), "--no-profile"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not deform_ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert deform_ckpt.exists(), "the second run never checkpointed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    client, before = children(uri)
    status = {r.info.run_name: r.info.status for r in before}
    assert status["standard/seed=0"] == "FINISHED"
    assert status["deform/seed=0"] == "RUNNING"  # left behind by the killed process
    standard_id = next(r.info.run_id for r in before if r.info.run_name == "standard/seed=0")

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "marked stale RUNNING run deform/seed=0 as KILLED" in done.stdout
    assert "resuming after epoch" in done.stdout

    _, after = children(uri)
    assert len(after) == 2, "a resumed run continues its own MLflow run"
    assert all(r.info.status == "FINISHED" for r in after)
    deform = next(r for r in after if r.info.run_name == "deform/seed=0")
    assert int(deform.data.tags["harness.resumed_from_epoch"]) >= 1
    steps = [m.step for m in client.get_metric_history(deform.info.run_id, "val/map")]
    assert sorted(steps) == list(range(1, 9)), "every epoch logged exactly once"
    standard = next(r for r in after if r.info.run_name == "standard/seed=0")
    assert standard.info.run_id == standard_id
    assert len(client.get_metric_history(standard_id, "val/map")) == 8, "finished run not redone"


def test_run_on_real_coco_mini(tmp_path, coco_mini_root):
    """The runner on real COCO files: 80 classes, official splits, a small subset."""
    file = tmp_path / "coco.yaml"
    file.write_text(f"""
name: coco_mini_smoke
base:
  data: {{source: coco, root: "{coco_mini_root}", image_size: 32, train_size: 48, val_size: 40}}
  model: {{arch: small3}}
  train: {{epochs: 1, batch_size: 16}}
  profile: {{enabled: false}}
variants:
  deform: {{model: {{deform_layers: "first:1", offset_channels: per_tap, modulated: true}}}}
""")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["run", str(file), "--tracking-uri", uri, "--results-dir", str(tmp_path / "results")]) == 0
    client, runs = children(uri, "coco_mini_smoke")
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/train_images"] == 48 and run.data.metrics["data/val_images"] == 40
    summary = client.download_artifacts(run.info.run_id, "model_summary.txt", str(tmp_path))
    assert "out_features=80" in Path(summary).read_text()  # the 80 COCO categories
