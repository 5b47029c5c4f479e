"""Fixture stores for the report tests: real sqlite MLflow stores written exactly as docs/tracking.md says.

`write_ablation` is the reusable writer: it logs a parent run and child runs (tags, params, per-epoch
metrics, per-run metrics at step 0, artifacts) with mlflow's own client, independently of the code under
test. `report_store` (session scope) holds four ablations:

- `dcn_placement`: variants conv (baseline), deform_first2, deform_all × data.train_size 250, 1000 ×
  seeds 1-3 × 5 epochs; deform_all/1000/seed=3 FAILED (OOM), deform_first2/250/seed=4 still RUNNING.
- `xss`: a variant named `<script>alert(1)</script>` and HTML in the description and failure reason.
- `all_failed`: two runs, both FAILED.
- `no_baseline`: no harness.baseline anywhere, one variant, no grid; solo/seed=1 re-logged epoch 5
  (as a resumed run does) with val_map 0.999.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

T0 = 1_750_000_000_000  # ms
VAL_METRICS = (
    "val/loss", "val/map", "val/micro_precision", "val/micro_recall", "val/micro_f1", "val/macro_precision",
    "val/macro_recall", "val/macro_f1", "val/cp", "val/cr", "val/cf1", "val/op", "val/or", "val/of1",
)
ENV = {
    "harness.git_commit": "0123456789abcdef0123456789abcdef01234567",
    "harness.device": "cpu",
    "harness.host": "testhost",
    "harness.torch": "2.5.0",
    "harness.cuda": "none",
    "harness.version": "0.1.0",
}
XSS = "<script>alert(1)</script>"


@dataclass
class ChildSpec:
    variant: str
    seed: int
    grid: dict[str, Any] = field(default_factory=dict)  # non-seed grid values
    status: str = "FINISHED"
    epochs: int = 5
    quality: float = 0.5  # drives the metric values
    cost: float = 1.0  # s/epoch
    failure: str | None = None
    baseline: bool = False
    deform_share: float = 0.0


def child_values(spec: ChildSpec) -> dict[str, Any]:
    """Deterministic per-epoch histories and per-run metrics for one child run."""
    size = int(spec.grid.get("data.train_size", 0))
    rng = np.random.default_rng([zlib.crc32(spec.variant.encode()) % 10_000, spec.seed, size])
    epochs = np.arange(1, spec.epochs + 1)
    ramp = 1 - np.exp(-epochs / 2)
    hist: dict[str, list[float]] = {}
    val_map = spec.quality * ramp + rng.normal(0, 0.01, spec.epochs)
    hist["val/map"] = list(val_map)
    hist["train/loss"] = list(0.7 * np.exp(-epochs / 3) + 0.1 + rng.normal(0, 0.005, spec.epochs))
    hist["val/loss"] = list(0.75 * np.exp(-epochs / 3) + 0.15 - 0.1 * spec.quality + rng.normal(0, 0.01, spec.epochs))
    for name in VAL_METRICS:
        if name not in hist:
            hist[name] = list(np.clip(val_map + rng.normal(0, 0.02, spec.epochs) + 0.05, 0, 1))
    hist["cost/epoch_time_s"] = list(spec.cost * (1 + rng.normal(0, 0.03, spec.epochs)))
    n_train = spec.grid.get("data.train_size", 500)
    hist["cost/train_images_per_s"] = [n_train / t for t in hist["cost/epoch_time_s"]]
    hist["cost/data_wait_s"] = list(0.05 * np.ones(spec.epochs))
    hist["train/lr"] = list(0.01 * np.ones(spec.epochs))
    final: dict[str, float] = {}
    for name in VAL_METRICS:
        arr = np.asarray(hist[name])
        final[f"best/{name}"] = float(arr.min() if name == "val/loss" else arr.max())
        final[f"final/{name}"] = float(arr[-1])
    final["best/epoch"] = float(int(np.argmax(hist["val/map"])) + 1)
    final["cost/mean_epoch_time_s"] = float(np.mean(hist["cost/epoch_time_s"]))
    final["cost/mean_train_images_per_s"] = float(np.mean(hist["cost/train_images_per_s"]))
    final["cost/total_data_wait_s"] = float(np.sum(hist["cost/data_wait_s"]))
    final["cost/peak_rss_mb"] = float(900 + 100 * spec.cost + rng.integers(0, 20))
    final["cost/params"] = float(1_200_000 + 50_000 * spec.cost)
    final["cost/flops_per_image"] = float(3.1e8 * spec.cost)
    final["cost/profile_deform_share"] = spec.deform_share
    final["cost/profile_step_ms"] = 40.0 * spec.cost
    return {"history": hist, "final": final}


def op_table_csv(spec: ChildSpec) -> str:
    rows = [("aten::convolution_backward", 40, 120.0 * spec.cost), ("aten::mkldnn_convolution", 40, 80.0),
            ("aten::addmm", 20, 10.0), ("aten::relu", 60, 6.0), ("aten::batch_norm", 60, 9.5)]
    if spec.deform_share:
        rows.append(("harness::deform_bilinear_sample", 40, 200.0 * spec.deform_share))
    total = sum(r[2] for r in rows)
    lines = ["name,calls,self_cpu_ms,self_cuda_ms,cpu_total_ms,share"]
    lines += [f"{n},{c},{ms},0,{ms * 1.2},{ms / total:.4f}" for n, c, ms in rows]
    return "\n".join(lines) + "\n"


def run_name(spec: ChildSpec) -> str:
    return "/".join([spec.variant, *(f"{k}={v}" for k, v in spec.grid.items()), f"seed={spec.seed}"])


def group_name(spec: ChildSpec) -> str:
    return " · ".join([spec.variant, *(f"{k}={v}" for k, v in spec.grid.items())])


def flat_name(key: str) -> str:
    """The name a store written before the metric prefixes holds (best/val/map: best_val_map; cost/params: params)."""
    fixed = {"train/loss": "train_loss", "train/lr": "lr", "best/epoch": "best_epoch"}
    if key in fixed:
        return fixed[key]
    head, _, rest = key.partition("/")
    if head in ("best", "final"):
        return f"{head}_{flat_name(rest)}"
    if head in ("val", "test", "ood", "chance"):
        return f"{head}_{rest}"
    return rest


def write_ablation(
    uri: str,
    artifact_root: Path,
    name: str,
    description: str,
    baseline: str | None,
    children: list[ChildSpec],
    flat: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write one ablation (experiment) the way the runner does; return {run_name: {values, spec, run_id}}.

    `flat`: metrics under the names stores held before the prefixes (`flat_name`), as an old store has them.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(name, artifact_location=(artifact_root / name.replace("/", "_")).as_uri())
    client.set_experiment_tag(exp_id, "harness.description", description)
    if baseline is not None:
        client.set_experiment_tag(exp_id, "harness.baseline", baseline)
    parent = client.create_run(exp_id, run_name=f"{name} run", tags={"harness.role": "parent", **ENV})
    written: dict[str, dict[str, Any]] = {}
    for spec in children:
        grid = {**spec.grid, "seed": spec.seed}
        tags = {
            "harness.role": "child",
            "mlflow.parentRunId": parent.info.run_id,
            "harness.variant": spec.variant,
            "harness.group": group_name(spec),
            "harness.grid": json.dumps(grid),
            "harness.seed": str(spec.seed),
            "harness.config_hash": f"hash-{len(written)}",
            **ENV,
        }
        if spec.baseline:
            tags["harness.baseline"] = "true"
        if spec.failure:
            tags["harness.failure"] = spec.failure
        run = client.create_run(exp_id, run_name=run_name(spec), tags=tags, start_time=T0 + 1000 * len(written))
        rid = run.info.run_id
        values = child_values(spec)
        logged = spec.epochs if spec.status == "FINISHED" else 2
        key_of = flat_name if flat else str
        metrics = [
            Metric(key_of(key), float(vals[i]), T0 + i, i + 1)
            for key, vals in values["history"].items() for i in range(logged)
        ]
        if spec.status == "FINISHED":
            metrics += [Metric(key_of(k), v, T0 + 100, 0) for k, v in values["final"].items()]
        params = {"model.deform_layers": spec.variant, "train.lr": "0.01", "train.epochs": str(spec.epochs),
                  "seed": str(spec.seed), **{k: str(v) for k, v in spec.grid.items()}}
        client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag("harness.trace_dir", f"results/profiles/{rid}")])
        if spec.status == "FINISHED":
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "profile").mkdir()
                Path(tmp, "profile", "op_table.csv").write_text(op_table_csv(spec))
                Path(tmp, "config.yaml").write_text(f"seed: {spec.seed}\n")
                Path(tmp, "model_summary.txt").write_text("model\n")
                client.log_artifacts(rid, tmp)
        if spec.status != "RUNNING":
            client.set_terminated(rid, status=spec.status, end_time=T0 + 60_000 + 1000 * len(written))
        written[run_name(spec)] = {"spec": spec, "values": values, "run_id": rid, "logged_epochs": logged}
    any_bad = any(s.status != "FINISHED" for s in children)
    client.set_terminated(parent.info.run_id, status="FAILED" if any_bad else "FINISHED", end_time=T0 + 200_000)
    return written


QUALITY = {"conv": 0.50, "deform_first2": 0.56, "deform_all": 0.53}
COST = {"conv": 1.0, "deform_first2": 1.6, "deform_all": 2.4}
SHARE = {"conv": 0.0, "deform_first2": 0.31, "deform_all": 0.55}
OOM = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def placement_children() -> list[ChildSpec]:
    children = []
    for size in (250, 1000):
        for variant in ("conv", "deform_first2", "deform_all"):
            for seed in (1, 2, 3):
                failed = variant == "deform_all" and size == 1000 and seed == 3
                children.append(
                    ChildSpec(
                        variant, seed, {"data.train_size": size},
                        status="FAILED" if failed else "FINISHED",
                        quality=QUALITY[variant] + (0.1 if size == 1000 else 0.0),
                        cost=COST[variant] * size / 250,
                        failure=OOM if failed else None,
                        baseline=variant == "conv",
                        deform_share=SHARE[variant],
                    )
                )
    children.append(ChildSpec("deform_first2", 4, {"data.train_size": 250}, status="RUNNING",
                              quality=0.9, cost=1.6))
    return children


@dataclass
class ReportStore:
    uri: str
    root: Path
    written: dict[str, dict[str, dict[str, Any]]]  # ablation -> run name -> info
    empty_uri: str  # an MLflow store with no runs at all


@pytest.fixture(scope="session")
def report_store(tmp_path_factory: pytest.TempPathFactory) -> ReportStore:
    root = tmp_path_factory.mktemp("mlstore")
    uri = f"sqlite:///{root}/mlflow.db"
    art = root / "mlartifacts"
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables (slow: migrations) ...
    shutil.copy(root / "mlflow.db", root / "empty.db")  # ... once, for the empty store too
    written = {
        "dcn_placement": write_ablation(uri, art, "dcn_placement", "Where do deformable layers help?", "conv",
                                        placement_children()),
        "xss": write_ablation(
            uri, art, "xss", f"desc {XSS} & <b>bold</b>", "conv",
            [ChildSpec("conv", s, quality=0.4, baseline=True) for s in (1, 2)]
            + [ChildSpec(XSS, s, quality=0.45, cost=1.3, deform_share=0.2) for s in (1, 2)]
            + [ChildSpec(XSS, 3, status="FAILED", failure=f"ValueError: {XSS}")],
        ),
        "all_failed": write_ablation(
            uri, art, "all_failed", "nothing worked", "conv",
            [ChildSpec("conv", s, status="FAILED", failure="FileNotFoundError: data/train.json") for s in (1, 2)],
        ),
        "no_baseline": write_ablation(uri, art, "no_baseline", "", None, [ChildSpec("solo", s) for s in (1, 2)]),
    }
    # a resumed run logs epoch 5 again, later: the report must use the later value
    from mlflow.entities import Metric

    resumed = written["no_baseline"]["solo/seed=1"]
    MlflowClient(tracking_uri=uri).log_batch(resumed["run_id"], metrics=[Metric("val/map", 0.999, T0 + 10_000, 5)])
    return ReportStore(uri=uri, root=root, written=written, empty_uri=f"sqlite:///{root}/empty.db")
