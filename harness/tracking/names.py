"""Every name the harness writes to a store: MLflow tags, metric keys and artifact paths, Optuna attributes.

Writers (runner, tune, analysis) and readers (report, eval) import these; docs/tracking.md lists them
with their meaning. A name changed here changes in both places at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PREFIX = "harness."

# --- run roles (tag ROLE) -----------------------------------------------------------------------------
ROLE = "harness.role"
PARENT, CHILD, STUDY_ROLE, TRIAL_ROLE = "parent", "child", "study", "trial"
MLFLOW_PARENT = "mlflow.parentRunId"

# --- experiment tags -------------------------------------------------------------------------------------
DESCRIPTION = "harness.description"
BASELINE_VARIANT = "harness.baseline"  # on the experiment: the baseline variant's name

# --- the environment a run ran in (every parent, child and study run) -------------------------------------
GIT_COMMIT = "harness.git_commit"
DEVICE = "harness.device"
DCN_KERNEL = "harness.dcn_kernel"
SETTINGS = "harness.settings"
HOST = "harness.host"
PID = "harness.pid"
TORCH = "harness.torch"
CUDA = "harness.cuda"
VERSION = "harness.version"
PYTHON = "harness.python"
PACKAGES = "harness.packages"
WORLD_SIZE = "harness.world_size"
EXECUTOR = "harness.executor"

# --- parent runs ----------------------------------------------------------------------------------------
ABLATION_FILE = "harness.ablation_file"
PLANNED_RUNS = "harness.planned_runs"

# --- child (training) runs ------------------------------------------------------------------------------
VARIANT = "harness.variant"
GROUP = "harness.group"
GRID = "harness.grid"
SEED = "harness.seed"
CONFIG_HASH = "harness.config_hash"
BASELINE = "harness.baseline"  # on a child run: "true" for the baseline variant's runs
TRACE_DIR = "harness.trace_dir"
FAILURE = "harness.failure"
STALE = "harness.stale"
RESUMED_BY = "harness.resumed_by"
RESUMED_FROM_EPOCH = "harness.resumed_from_epoch"
ANALYSIS = "harness.analysis"
ANALYSIS_FAILURE = "harness.analysis_failure"
LR_FROM_STUDY = "harness.lr_from_study"  # the Optuna study whose best rate train.lr holds
OWNER = "harness.owner"  # host:pid of the process that trains the run now (its lease)
HEARTBEAT = "harness.heartbeat"  # Unix time of the owner's last sign of life

# --- Optuna studies mirrored in MLflow (study and trial runs) -------------------------------------------
STUDY = "harness.study"
TRIAL_NUMBER = "harness.trial_number"
TRIAL_STATE = "harness.trial_state"
PRUNED_AT_EPOCH = "harness.pruned_at_epoch"
METRIC = "harness.metric"
DIRECTION = "harness.direction"
N_TRIALS = "harness.n_trials"
OPTUNA_STORAGE = "harness.optuna_storage"
SAMPLER = "harness.sampler"
PRUNER = "harness.pruner"
BEST_TRIAL = "harness.best_trial"
BEST_VALUE = "harness.best_value"
BEST_PARAMS = "harness.best_params"
BEST_PARAM_PREFIX = "harness.best_"  # + a searched parameter's name, e.g. harness.best_lr
LAST_WORKER_END = "harness.last_worker_end"

# --- Optuna user attributes -----------------------------------------------------------------------------
# on trials
TRIAL_HOST = HOST
TRIAL_PID = PID
TRIAL_RUN_ID = "harness.mlflow_run_id"
TRIAL_FAILURE = FAILURE
TRIAL_INTERRUPTED = "harness.interrupted"
TRIAL_PRUNED_AT = PRUNED_AT_EPOCH
# on studies
STUDY_METRIC = METRIC
STUDY_DIRECTION = DIRECTION
STUDY_ABLATION = "harness.ablation"
STUDY_VARIANT = VARIANT
STUDY_GRID = GRID
STUDY_ENQUEUED = "harness.enqueued"

# --- metrics --------------------------------------------------------------------------------------------
# Grouped by the prefix before the first "/", the way the MLflow UI groups its charts: train/ (loss,
# rate), val/, test/, ood/, chance/ (one harness.metrics name each), best/ and final/ (a per-epoch
# metric's best and last value), cost/ (time, memory, size), data/ (set sizes), tune/ (Optuna), and
# harness eval's robust/, offset/, erf/; MLflow's own system metrics are system/.
TRAIN_PREFIX, VAL_PREFIX, TEST_PREFIX, OOD_PREFIX, CHANCE_PREFIX = "train/", "val/", "test/", "ood/", "chance/"
BEST_PREFIX, FINAL_PREFIX, COST_PREFIX, DATA_PREFIX, TUNE_PREFIX = "best/", "final/", "cost/", "data/", "tune/"
SYSTEM_PREFIX = "system/"  # MLflow's system metrics (train.system_metrics)
# Per epoch (step = epoch): train/loss, val/<m> for every harness.metrics name m, and these.
TRAIN_LOSS = "train/loss"
LR = "train/lr"
VAL_LOSS = "val/loss"
VAL_MAP = "val/map"
VAL_MICRO_F1 = "val/micro_f1"
VAL_MICRO_PRECISION = "val/micro_precision"
VAL_MICRO_RECALL = "val/micro_recall"
EPOCH_TIME = "cost/epoch_time_s"
TRAIN_IMAGES_PER_S = "cost/train_images_per_s"
DATA_WAIT = "cost/data_wait_s"
# Once per run (step 0): best/<val metric>, final/<val metric>, and these.
BEST_EPOCH = "best/epoch"
MEAN_EPOCH_TIME = "cost/mean_epoch_time_s"
MEAN_TRAIN_IMAGES_PER_S = "cost/mean_train_images_per_s"
TOTAL_DATA_WAIT = "cost/total_data_wait_s"
PEAK_RSS_MB = "cost/peak_rss_mb"
PEAK_CUDA_MB = "cost/peak_cuda_mb"
PARAMS = "cost/params"
FLOPS_PER_IMAGE = "cost/flops_per_image"
PROFILE_DEFORM_SHARE = "cost/profile_deform_share"
PROFILE_STEP_MS = "cost/profile_step_ms"
LR_USED = "train/lr_used"
TRAIN_IMAGES = "data/train_images"
VAL_IMAGES = "data/val_images"
SKIPPED_IMAGES = "data/skipped_images"
# Held-out evaluation at the selected epoch (the best val/map epoch), step 0: test/<m> for every
# harness.metrics name m on data.test_size's subset; ood/<m> on the synthetic task's out-of-distribution
# set; <prefix>map_<size> per dominant-object size; chance/<m>: the label-prior baseline (each class
# scored by its training frequency) on the headline set (test when there is one, else val).
SELECTED_EPOCH = "best/selected_epoch"
OBJECT_SIZES = ("small", "medium", "large")  # COCO areas: < 32², < 96², larger (of the image's largest object)
TEST_IMAGES = "data/test_images"
OOD_IMAGES = "data/ood_images"
OBJECTIVE = "tune/objective"  # a trial's score
STUDY_BEST_VALUE = "tune/best_value"  # on a study's run, step = trial number
# harness eval (step 0): robust/…, offset/…, erf/…
ANALYSIS_METRIC_PREFIXES = ("robust/", "offset/", "erf/")
ROBUST_PREFIX, OFFSET_PREFIX, ERF_PREFIX = ANALYSIS_METRIC_PREFIXES

# The flat names stores written before the prefixes hold (val_map, best_val_map, test_map, lr, …). The
# search objective (search.objective.metric) keeps this spelling too: logged_name maps it.
_LEGACY = {
    TRAIN_LOSS: "train_loss", LR: "lr", EPOCH_TIME: "epoch_time_s", TRAIN_IMAGES_PER_S: "train_images_per_s",
    DATA_WAIT: "data_wait_s", BEST_EPOCH: "best_epoch", MEAN_EPOCH_TIME: "mean_epoch_time_s",
    MEAN_TRAIN_IMAGES_PER_S: "mean_train_images_per_s", TOTAL_DATA_WAIT: "total_data_wait_s",
    PEAK_RSS_MB: "peak_rss_mb", PEAK_CUDA_MB: "peak_cuda_mb", PARAMS: "params", FLOPS_PER_IMAGE: "flops_per_image",
    PROFILE_DEFORM_SHARE: "profile_deform_share", PROFILE_STEP_MS: "profile_step_ms", LR_USED: "lr_used",
    TRAIN_IMAGES: "train_images", VAL_IMAGES: "val_images", SKIPPED_IMAGES: "skipped_images",
    SELECTED_EPOCH: "selected_epoch", TEST_IMAGES: "test_images", OOD_IMAGES: "ood_images",
    OBJECTIVE: "objective", STUDY_BEST_VALUE: "best_value",
}
_CURRENT = {old: new for new, old in _LEGACY.items()}
_LEGACY_WRAPPERS = ((BEST_PREFIX, "best_"), (FINAL_PREFIX, "final_"))  # around a whole metric name
_LEGACY_GROUPS = ((VAL_PREFIX, "val_"), (TEST_PREFIX, "test_"), (OOD_PREFIX, "ood_"), (CHANCE_PREFIX, "chance_"))

# --- artifacts ------------------------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.yaml"
MODEL_SUMMARY_ARTIFACT = "model_summary.txt"
OP_TABLE_ARTIFACT = "profile/op_table.csv"
TRACEBACK_ARTIFACT = "traceback.txt"
PER_CLASS_AP_ARTIFACT = "eval/per_class_ap.json"  # {"split", "epoch", "classes", "ap", "support"}
ANALYSIS_ARTIFACT_DIR = "analysis"
# the files of harness eval under ANALYSIS_ARTIFACT_DIR; analysis_artifact(name) is their artifact path
ANALYSIS_ROBUSTNESS = "robustness.csv"
ANALYSIS_OFFSET_STATS = "offset_stats.csv"
ANALYSIS_OFFSET_HIST = "offset_hist.csv"
ANALYSIS_OFFSET_HIST_PLOT = "offset_hist.png"
ANALYSIS_SAMPLING_PLOT = "sampling.png"
ANALYSIS_SAMPLING_POINTS = "sampling.json"
ANALYSIS_ERF_MAP = "erf.npy"
ANALYSIS_ERF_PLOT = "erf.png"


def best_of(metric: str) -> str:
    """The run-level metric holding `metric`'s best epoch value, e.g. best/val/map."""
    return f"{BEST_PREFIX}{metric}"


def final_of(metric: str) -> str:
    """The run-level metric holding `metric`'s last epoch value, e.g. final/val/map."""
    return f"{FINAL_PREFIX}{metric}"


def val_of(metric: str) -> str:
    """The per-epoch metric of a `harness.metrics` name, e.g. val/map for map."""
    return f"{VAL_PREFIX}{metric}"


def test_of(metric: str) -> str:
    """The held-out metric of a `harness.metrics` name at the selected epoch, e.g. test/map."""
    return f"{TEST_PREFIX}{metric}"


def ood_of(metric: str) -> str:
    """The out-of-distribution metric of a `harness.metrics` name at the selected epoch, e.g. ood/map."""
    return f"{OOD_PREFIX}{metric}"


def chance_of(metric: str) -> str:
    """The label-prior baseline's value of a `harness.metrics` name, e.g. chance/map."""
    return f"{CHANCE_PREFIX}{metric}"


def by_size(metric: str, size: str) -> str:
    """`metric` on the images whose largest object is of `size` (OBJECT_SIZES), e.g. test/map_small."""
    return f"{metric}_{size}"


def legacy_name(name: str) -> str:
    """The flat name a store written before the prefixes holds for metric `name` (best/val/map:
    best_val_map), so readers find old runs; a name that never had another spelling comes back as is."""
    if name in _LEGACY:
        return _LEGACY[name]
    for new, old in _LEGACY_WRAPPERS:
        if name.startswith(new):
            return old + legacy_name(name.removeprefix(new))
    for new, old in _LEGACY_GROUPS:
        if name.startswith(new):
            return old + name.removeprefix(new)
    return name


def logged_name(name: str) -> str:
    """The metric the harness logs now for a flat name (val_map: val/map); the inverse of `legacy_name`.
    Maps the search objective's spelling and old stores' keys; a current name comes back as is."""
    if name in _CURRENT:
        return _CURRENT[name]
    for new, old in _LEGACY_WRAPPERS:
        if name.startswith(old):
            return new + logged_name(name.removeprefix(old))
    for new, old in _LEGACY_GROUPS:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def with_logged_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics keyed by their current names: an old store's flat keys renamed, and where a run
    holds both spellings the current one wins."""
    out = {logged_name(k): v for k, v in metrics.items() if logged_name(k) not in metrics}
    out.update({k: v for k, v in metrics.items() if logged_name(k) == k})
    return out


def analysis_artifact(name: str) -> str:
    """The artifact path of a `harness eval` file, e.g. analysis/erf.npy for ANALYSIS_ERF_MAP."""
    return f"{ANALYSIS_ARTIFACT_DIR}/{name}"


# --- what the MLflow UI reads (its own tag names) ---------------------------------------------------------
MLFLOW_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"  # the UI's model-training view (not GenAI)
MLFLOW_NOTE = "mlflow.note.content"  # the description the UI shows on an experiment or run
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_SOURCE_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_USER = "mlflow.user"
MLFLOW_DATASET_CONTEXT = "mlflow.data.context"
GIT_DIRTY = "harness.git_dirty"  # "true" when the working tree had uncommitted changes

# --- artifacts that travel with a run ---------------------------------------------------------------------
TRACE_ARTIFACT_DIR = "profile/trace"  # the gzipped Chrome trace(s) of the profiling window
CHECKPOINT_ARTIFACT_DIR = "checkpoint"  # the last checkpoint, CHECKPOINT_ARTIFACT_DIR/last.pt
COMPARISON_ARTIFACT = "comparison.csv"  # on a parent run: one row per child, its step-0 metrics
REPORT_ARTIFACT_DIR = "report"  # on a parent run: the ablation's rendered HTML report, report/<ablation>.html


def report_artifact(ablation: str) -> str:
    """The artifact path of an ablation's HTML report on its parent runs, e.g. report/quickstart.html (a
    name's characters other than letters, digits, '.', '_' and '-' become '_')."""
    return f"{REPORT_ARTIFACT_DIR}/{re.sub(r'[^A-Za-z0-9._-]', '_', ablation)}.html"
