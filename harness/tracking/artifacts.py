"""What travels with a run beyond metrics: its data as an MLflow dataset input, its profiler trace and last
checkpoint as artifacts, a parent's comparison table, and fetching those back when the local copy is gone.

A run's record then suffices on another machine (or a tracking server alone): `harness trace` finds the
trace and `harness eval` the weights among the artifacts when `results/` is not there.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from harness.errors import HarnessError
from harness.tracking import names
from harness.tracking.retry import duplicate_key
from harness.tracking.store import AblationStore, ChildRun, attach_run, read_run_text
from harness.tracking.uri import check_store, resolve_uri, sqlite_path

CHECKPOINT_AUTO_LIMIT_MB = 50.0  # train.log_checkpoint: auto uploads checkpoints below this size
CHECKPOINT_FILE = "last.pt"
TRACE_SUFFIX = ".pt.trace.json"
# metrics logged once per epoch; every other metric of a child run is a step-0 summary
PER_EPOCH_METRICS = frozenset({names.TRAIN_LOSS, names.EPOCH_TIME, names.TRAIN_IMAGES_PER_S, names.DATA_WAIT,
                               names.LR})


# --- the data a run read, as MLflow dataset inputs (the UI's "Datasets used") --------------------------------


def _cache_digest(split_cache: dict[str, Any], fallback: str) -> str:
    """The data cache key the cache file is named by (`...-<first 20 hex digits>.npy`), else `fallback`."""
    stem = Path(str(split_cache.get("path", ""))).stem
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return tail if len(tail) == 20 and all(c in "0123456789abcdef" for c in tail) else fallback


def dataset_inputs(data_config: Any, data: Any) -> list[Any]:
    """One MLflow `DatasetInput` per split a run reads (context training / validation).

    `data` is a `harness.data.PreparedData`. Name: `<source>/<split>`; digest: the split's data cache key;
    profile: the split's size and the image geometry, so the UI tells the subsets of two runs apart.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for which, context, split, images in (("train", "training", data.train_split, data.train_images),
                                          ("val", "validation", data.val_split, data.val_images)):
        ids = json.dumps([int(i) for i in split.image_ids]).encode()
        digest = _cache_digest(data.cache.get(which, {}), hashlib.sha256(ids).hexdigest()[:20])
        profile = {"images": int(images.shape[0]), "train_images": int(data.train_images.shape[0]),
                   "val_images": int(data.val_images.shape[0]), "classes": int(data.num_classes),
                   "image_size": int(data.image_size), "resize": str(data.resize), "skipped": int(data.skipped)}
        dataset = Dataset(
            name=f"{data_config.source}/{split.split}", digest=digest, source_type="local",
            source=json.dumps({"uri": str(Path(split.root).resolve())}), profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(names.MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def log_data_inputs(run: ChildRun, data_config: Any, data: Any) -> None:
    """Record the train and val subsets `run` read as its dataset inputs (a resumed run logs them again)."""
    log_datasets(run, dataset_inputs(data_config, data))


def log_datasets(run: ChildRun, datasets: list[Any], attempts: int = 5) -> None:
    """`run.client.log_inputs`, tried again when a concurrent run inserted the same dataset first.

    Runs that start together on one data subset all insert its dataset row; the store looks for it and
    inserts it in one transaction, so all but one fail on its unique key. Tried again, the row is there.
    """
    for attempt in range(attempts):
        try:
            run.client.log_inputs(run.run_id, datasets=datasets)
            return
        except Exception as exc:
            if attempt == attempts - 1 or not duplicate_key(exc):
                raise
            time.sleep(0.1 * (attempt + 1))


# --- the trace and the checkpoint, uploaded after training ----------------------------------------------------


def gzip_traces(trace_dir: Path, out_dir: Path) -> list[Path]:
    """Gzipped copies of the Chrome trace JSON files under `trace_dir` (already gzipped ones copied as they are)."""
    written = []
    for source in sorted(trace_dir.glob(f"*{TRACE_SUFFIX}*")) if trace_dir.is_dir() else []:
        target = out_dir / (source.name if source.name.endswith(".gz") else source.name + ".gz")
        if source.name.endswith(".gz"):
            shutil.copyfile(source, target)
        else:
            with source.open("rb") as raw, gzip.open(target, "wb", compresslevel=6) as packed:
                shutil.copyfileobj(raw, packed)
        written.append(target)
    return written


def should_log_checkpoint(checkpoint: Path, mode: str | bool) -> bool:
    """`train.log_checkpoint`: true, false, or auto (only files under CHECKPOINT_AUTO_LIMIT_MB)."""
    if mode is False or not checkpoint.is_file():
        return False
    return mode is True or checkpoint.stat().st_size < CHECKPOINT_AUTO_LIMIT_MB * 1024 * 1024


def log_run_artifacts(run: ChildRun, trace_dir: Path | None, checkpoint: Path, log_checkpoint: str | bool) -> None:
    """Upload the run's profiler trace (gzipped) and, as `train.log_checkpoint` says, its last checkpoint."""
    if trace_dir is not None:
        with tempfile.TemporaryDirectory(prefix="harness-trace-") as tmp:
            if gzip_traces(trace_dir, Path(tmp)):
                run.client.log_artifacts(run.run_id, tmp, names.TRACE_ARTIFACT_DIR)
    if should_log_checkpoint(checkpoint, log_checkpoint):
        run.client.log_artifact(run.run_id, str(checkpoint), names.CHECKPOINT_ARTIFACT_DIR)


class CheckpointUploads:
    """The run's checkpoint uploaded every `every` epochs while it trains (as `train.log_checkpoint` says), so
    a run whose machine and results directory are lost resumes elsewhere from the artifact (0: at the end only)."""

    def __init__(self, run: ChildRun, checkpoint: Path, mode: str | bool, every: int) -> None:
        self.run, self.checkpoint, self.mode, self.every = run, checkpoint, mode, every
        self.uploaded = 0  # the last epoch whose checkpoint is an artifact

    def after_epoch(self, epoch: int) -> None:
        """Called after epoch `epoch`'s checkpoint is saved, before its metrics are logged: the artifact is
        never behind the metrics, so a resume from it logs no epoch twice."""
        if self.every > 0 and epoch % self.every == 0 and should_log_checkpoint(self.checkpoint, self.mode):
            self.run.client.log_artifact(self.run.run_id, str(self.checkpoint), names.CHECKPOINT_ARTIFACT_DIR)
            self.uploaded = epoch

    def final_mode(self, last_epoch: int) -> str | bool:
        """`train.log_checkpoint` for the upload after training: False when the last epoch is already there."""
        return False if self.uploaded == last_epoch else self.mode


def has_checkpoint_artifact(run: ChildRun) -> bool:
    """Whether `run` logged a checkpoint artifact (a run to resume without its local checkpoint)."""
    try:
        listed = run.client.list_artifacts(run.run_id, names.CHECKPOINT_ARTIFACT_DIR)
    except Exception:  # an artifact location this machine cannot read holds nothing for it
        return False
    return any(Path(a.path).name == CHECKPOINT_FILE for a in listed)


# --- fetching artifacts back -------------------------------------------------------------------------------------


def _moved_store_dir(run: ChildRun, tracking_uri: str | None, artifact_path: str) -> Path | None:
    """`artifact_path` of a run whose sqlite store was copied elsewhere: MLflow keeps absolute artifact
    locations, so look where the copy keeps them, under `<store dir>/mlartifacts/` at the same relative place."""
    db = sqlite_path(tracking_uri or "")
    if db is None:
        return None
    parts = Path(unquote(urlparse(run.client.get_run(run.run_id).info.artifact_uri or "").path)).parts
    if "mlartifacts" not in parts:
        return None
    tail = parts[len(parts) - parts[::-1].index("mlartifacts"):]
    candidate = db.parent.joinpath("mlartifacts", *tail, artifact_path)
    return candidate if candidate.exists() else None


def download(run: ChildRun, artifact_path: str, dest: Path, tracking_uri: str | None = None) -> Path | None:
    """Download `artifact_path` (file or directory) of `run` into `dest`; None when the run has no such artifact."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return Path(run.client.download_artifacts(run.run_id, artifact_path, str(dest)))
    except Exception:  # missing artifact, or an artifact location that no longer exists here
        moved = _moved_store_dir(run, tracking_uri, artifact_path)
    if moved is None:
        return None
    target = dest / moved.name
    if moved.is_dir():
        shutil.copytree(moved, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(moved, target)
    return target


def artifact_uri_path(run: ChildRun) -> Path | None:
    """The local directory of a run's artifacts when they are on this file system."""
    uri = run.client.get_run(run.run_id).info.artifact_uri or ""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(unquote(parsed.path))
    return path if path.is_dir() else None


def fetch_checkpoint(run: ChildRun, local: Path, tracking_uri: str | None = None) -> Path:
    """`local` when the checkpoint file is there; else the run's checkpoint artifact downloaded to `local`
    (when the run logged one). The caller reports a checkpoint that is in neither place."""
    if local.is_file():
        return local
    with tempfile.TemporaryDirectory(prefix="harness-ckpt-") as tmp:
        found = download(run, f"{names.CHECKPOINT_ARTIFACT_DIR}/{CHECKPOINT_FILE}", Path(tmp), tracking_uri)
        if found is not None and found.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(found), local)
    return local


# --- a parent's summary: one row per child run -----------------------------------------------------------------


def comparison_csv(children: Iterable[Any]) -> str:
    """CSV of child runs (MLflow `Run`s): name, variant, seed, status, run id, then every step-0 metric."""
    runs = sorted(children, key=lambda r: r.info.run_name or "")
    metrics_of = {r.info.run_id: names.with_logged_names(r.data.metrics) for r in runs}  # older runs: flat names
    keys = sorted({k for metrics in metrics_of.values() for k in metrics
                   if k not in PER_EPOCH_METRICS and not k.startswith((names.VAL_PREFIX, names.SYSTEM_PREFIX))})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", "variant", "seed", "status", "run_id", *keys])
    for r in runs:
        tags, metrics = r.data.tags, metrics_of[r.info.run_id]
        writer.writerow([r.info.run_name, tags.get(names.VARIANT, ""), tags.get(names.SEED, ""), r.info.status,
                         r.info.run_id, *(repr(metrics[k]) if k in metrics else "" for k in keys)])
    return out.getvalue()


def log_comparison(store: AblationStore, parent_id: str, config_hashes: Iterable[str]) -> None:
    """The parent run's summary artifact: a row per planned run (its FINISHED child when there is one, else
    its latest attempt), whoever trained it, so the parent compares the whole grid."""
    wanted = set(config_hashes)
    best: dict[str, Any] = {}
    for run in store.children():
        key = run.data.tags.get(names.CONFIG_HASH)
        if key not in wanted:
            continue
        rank = (run.info.status == "FINISHED", run.info.start_time or 0)
        held = best.get(key)
        if held is None or rank > (held.info.status == "FINISHED", held.info.start_time or 0):
            best[key] = run
    if best:
        store.client.log_text(parent_id, comparison_csv(best.values()), names.COMPARISON_ARTIFACT)


# --- a run's profiler trace, wherever it is (harness trace) -------------------------------------------------------


@dataclass
class RunTrace:
    """A run's trace files in one local directory (`source`: "local" results/profiles, or "artifacts"), and its
    op table as CSV text ("" when the run logged none)."""

    run_name: str
    directory: Path
    files: list[Path]
    source: str
    op_table_csv: str


def trace_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{TRACE_SUFFIX}*")) if directory.is_dir() else []


def find_trace(tracking_uri: str | None, run_id: str, dest: Path) -> RunTrace:
    """The trace of run `run_id`: the directory its tag `harness.trace_dir` names when that is on this machine,
    else its trace artifacts downloaded under `dest/<run id>`. A HarnessError when the run has neither."""
    resolved = resolve_uri(tracking_uri)
    check_store(resolved, create=False)
    handle = attach_run(resolved, run_id)
    try:
        run = handle.client.get_run(run_id)
    except Exception:
        raise HarnessError(f"no run {run_id!r} in {resolved}") from None
    name = run.info.run_name or run_id
    table = read_run_text(handle, names.OP_TABLE_ARTIFACT) or ""
    local = Path(run.data.tags.get(names.TRACE_DIR, ""))
    if run.data.tags.get(names.TRACE_DIR) and trace_files(local):
        return RunTrace(name, local, trace_files(local), "local", table)
    target = dest / run_id
    fetched = download(handle, names.TRACE_ARTIFACT_DIR, target, resolved)
    directory = fetched if fetched is not None and fetched.is_dir() else target
    files = trace_files(directory)
    if not files:
        raise HarnessError(f"run {name} ({run_id}) has no profiler trace, neither at {local} nor among its "
                           "artifacts (trained with --no-profile or profile.enabled: false?)")
    return RunTrace(name, directory, files, "artifacts", table)
