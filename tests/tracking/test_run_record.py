"""What a real `harness run` leaves in MLflow for its UI: kind, notes, source tags, datasets, artifacts, summary."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.checkpoints import checkpoint_path
from harness.tracking import names
from harness.tracking.artifacts import download, fetch_checkpoint, should_log_checkpoint
from harness.tracking.environment import source_tags
from harness.tracking.store import attach_run

DESCRIPTION_START = "Tiny ablation: does a deformable first layer"


def _runs(uri: str, role: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    return client, experiment, client.search_runs([experiment.experiment_id], f"tags.`harness.role` = '{role}'")


def test_experiment_and_runs_carry_kind_description_and_source(tiny_run):
    client, experiment, children = _runs(tiny_run.uri, names.CHILD)
    assert experiment.tags[names.MLFLOW_EXPERIMENT_KIND] == "custom_model_development"
    assert experiment.tags[names.MLFLOW_NOTE].startswith(DESCRIPTION_START)
    _, _, parents = _runs(tiny_run.uri, names.PARENT)
    assert len(parents) == 1 and len(children) == 2
    for run in [*parents, *children]:
        tags = run.data.tags
        assert DESCRIPTION_START in tags[names.MLFLOW_NOTE]
        assert tags[names.MLFLOW_SOURCE_NAME] == f"harness run {tiny_run.file}"
        assert tags[names.MLFLOW_SOURCE_TYPE] == "LOCAL"
        assert tags[names.MLFLOW_USER]
    for run in children:
        assert run.info.run_name in run.data.tags[names.MLFLOW_NOTE]


def test_source_tags_name_the_working_directory_commit_and_dirtiness(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    assert names.MLFLOW_SOURCE_GIT_COMMIT not in source_tags("harness run x.yaml", tmp_path)
    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    tags = source_tags("harness run x.yaml", tmp_path)
    assert tags[names.MLFLOW_SOURCE_GIT_COMMIT] == git("rev-parse", "HEAD")
    assert len(tags[names.MLFLOW_SOURCE_GIT_COMMIT]) == 40
    assert tags[names.GIT_DIRTY] == "false" and tags[names.MLFLOW_SOURCE_NAME] == "harness run x.yaml"
    (tmp_path / "a.txt").write_text("b")
    assert source_tags("harness run x.yaml", tmp_path)[names.GIT_DIRTY] == "true"


def test_children_log_their_train_and_val_subsets_as_dataset_inputs(tiny_run):
    _, _, children = _runs(tiny_run.uri, names.CHILD)
    for run in children:
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation"}
        assert inputs["training"].name == "coco/train2017" and inputs["validation"].name == "coco/val2017"
        train_profile = json.loads(inputs["training"].profile)
        assert train_profile["images"] == 64 and train_profile["val_images"] == 32
        cache_files = {p.stem.rsplit("-", 1)[-1] for p in (tiny_run.results / "cache").glob("*.npy")}
        assert inputs["training"].digest in cache_files and inputs["validation"].digest in cache_files
    assert children[0].inputs.dataset_inputs[0].dataset.digest in {
        i.dataset.digest for i in children[1].inputs.dataset_inputs}  # same subset, same digest


def test_trace_and_checkpoint_travel_as_artifacts(tiny_run, tmp_path):
    client, _, children = _runs(tiny_run.uri, names.CHILD)
    for run in children:
        traces = [a.path for a in client.list_artifacts(run.info.run_id, names.TRACE_ARTIFACT_DIR)]
        assert traces and all(p.endswith(".pt.trace.json.gz") for p in traces)
        local = Path(client.download_artifacts(run.info.run_id, traces[0], str(tmp_path)))
        assert "traceEvents" in json.loads(gzip.decompress(local.read_bytes()))
        assert [a.path for a in client.list_artifacts(run.info.run_id, names.CHECKPOINT_ARTIFACT_DIR)] == [
            f"{names.CHECKPOINT_ARTIFACT_DIR}/last.pt"]


def test_parent_holds_a_comparison_of_its_children(tiny_run, tmp_path):
    client, _, parents = _runs(tiny_run.uri, names.PARENT)
    path = client.download_artifacts(parents[0].info.run_id, names.COMPARISON_ARTIFACT, str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    assert sorted(r["run"] for r in rows) == ["deform/seed=0", "standard/seed=0"]
    assert all(r["status"] == "FINISHED" and float(r["best/val/map"]) >= 0 for r in rows)
    assert "val/map" not in rows[0] and "train/loss" not in rows[0]  # per-epoch metrics stay out


def test_eval_finds_the_checkpoint_among_the_artifacts_when_the_local_one_is_gone(tiny_run, tmp_path):
    _, experiment, children = _runs(tiny_run.uri, names.CHILD)
    run = children[0]
    local = checkpoint_path(tmp_path / "elsewhere", "tiny", run.data.tags[names.CONFIG_HASH])
    fetched = fetch_checkpoint(attach_run(tiny_run.uri, run.info.run_id), local, tiny_run.uri)
    original = checkpoint_path(tiny_run.results, "tiny", run.data.tags[names.CONFIG_HASH])
    assert fetched == local and local.read_bytes() == original.read_bytes()


def test_a_copied_store_keeps_its_artifacts_for_the_harness(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(Path(tiny_run.uri.removeprefix("sqlite:///")).parent, copy)
    uri = f"sqlite:///{copy}/mlflow.db"
    _, _, children = _runs(uri, names.CHILD)
    handle = attach_run(uri, children[0].info.run_id)
    original = Path(tiny_run.uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    moved = original.with_name("mlartifacts-moved")
    original.rename(moved)  # the original location is gone: only the copy holds the files
    try:
        found = download(handle, names.CONFIG_ARTIFACT, tmp_path / "out", uri)
    finally:
        moved.rename(original)
    assert found is not None and "model:" in found.read_text()


@pytest.mark.parametrize(("mode", "size_mb", "logged"), [
    ("auto", 1, True), ("auto", 60, False), (True, 60, True), (False, 1, False)])
def test_log_checkpoint_auto_uploads_only_small_checkpoints(tmp_path, mode, size_mb, logged):
    path = tmp_path / "last.pt"
    with path.open("wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    assert should_log_checkpoint(path, mode) is logged
    assert should_log_checkpoint(tmp_path / "missing.pt", True) is False
