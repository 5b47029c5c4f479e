"""How long `harness report` takes on a store of realistic size (default: 100 runs × 50 epochs).

`bench_report()` writes a synthetic ablation in the layout of docs/tracking.md into a temporary sqlite
store (or uses an existing store), then times the whole report path: open the store, read runs, metric
histories and op tables, compute the statistics, draw the plots and write the HTML.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harness.metrics import HIGHER_IS_BETTER
from harness.report.data import load_ablations
from harness.report.render import write_html_reports
from harness.tracking import names as tracking_names
from harness.tracking import query

VAL_METRICS = tuple(tracking_names.val_of(m) for m in HIGHER_IS_BETTER)  # val_loss, val_map, ...
VARIANTS = ("conv", "deform_last1", "deform_first2", "deform_all")
ENV_TAGS = {
    tracking_names.GIT_COMMIT: "synthetic",
    tracking_names.DEVICE: "cpu",
    tracking_names.HOST: "bench",
    tracking_names.TORCH: "n/a",
    tracking_names.CUDA: "none",
    tracking_names.VERSION: "0.1.0",
}


def synthetic_runs(n_runs: int = 100, epochs: int = 50, seed: int = 0) -> list[query.FixtureRun]:
    """`n_runs` child runs: 4 variants × train sizes × 5 seeds (as many sizes as needed), `epochs` each."""
    rng = np.random.default_rng(seed)
    seeds = range(1, 6)
    sizes = [250 * 2**i for i in range(max(1, -(-n_runs // (len(VARIANTS) * len(seeds)))))]
    runs = []
    for size, variant, s in itertools.product(sizes, VARIANTS, seeds):
        if len(runs) == n_runs:
            break
        vi = VARIANTS.index(variant)
        quality = 0.45 + 0.03 * vi - 0.012 * vi**2 + 0.04 * np.log2(size / 250)
        cost = (1 + 0.5 * vi) * size / 250
        ep = np.arange(1, epochs + 1)
        history: dict[str, list[float]] = {}
        base = quality * (1 - np.exp(-ep / (epochs / 5))) + rng.normal(0, 0.008, epochs)
        for m in VAL_METRICS:
            offset = 0.05 if m != tracking_names.VAL_MAP else 0
            history[m] = list(np.clip(base + rng.normal(0, 0.01, epochs) + offset, 0, 1))
        loss = 0.7 * np.exp(-ep / (epochs / 4)) + 0.2 - 0.1 * quality
        history[tracking_names.VAL_LOSS] = list(loss + rng.normal(0, 0.005, epochs))
        history[tracking_names.TRAIN_LOSS] = list(
            0.7 * np.exp(-ep / (epochs / 3)) + 0.05 + rng.normal(0, 0.004, epochs)
        )
        epoch_time = list(cost * (1 + rng.normal(0, 0.02, epochs)))
        history[tracking_names.EPOCH_TIME] = epoch_time
        history[tracking_names.TRAIN_IMAGES_PER_S] = [size / t for t in epoch_time]
        history[tracking_names.DATA_WAIT] = list(np.full(epochs, 0.02 * cost))
        history[tracking_names.LR] = list(0.01 * 0.5 * (1 + np.cos(np.pi * ep / epochs)))
        final: dict[str, float] = {}
        for m in VAL_METRICS:
            arr = np.asarray(history[m])
            final[tracking_names.best_of(m)] = float(arr.min() if m == tracking_names.VAL_LOSS else arr.max())
            final[tracking_names.final_of(m)] = float(arr[-1])
        share = 0.0 if vi == 0 else 0.15 * vi
        final.update({
            tracking_names.BEST_EPOCH: float(np.argmax(history[tracking_names.VAL_MAP]) + 1),
            tracking_names.MEAN_EPOCH_TIME: float(np.mean(epoch_time)),
            tracking_names.MEAN_TRAIN_IMAGES_PER_S: float(np.mean(history[tracking_names.TRAIN_IMAGES_PER_S])),
            tracking_names.TOTAL_DATA_WAIT: float(np.sum(history[tracking_names.DATA_WAIT])),
            tracking_names.PEAK_RSS_MB: float(1000 + 150 * vi + rng.normal(0, 5)),
            tracking_names.PARAMS: float(1.2e6 + 4e4 * vi),
            tracking_names.FLOPS_PER_IMAGE: float(3e8 * (1 + 0.4 * vi)),
            tracking_names.PROFILE_DEFORM_SHARE: share,
            tracking_names.PROFILE_STEP_MS: 40.0 * (1 + 0.5 * vi),
        })
        ops = [("aten::convolution_backward", 50.0), ("aten::mkldnn_convolution", 30.0), ("aten::addmm", 4.0)]
        if share:
            ops.append(("harness::deform_bilinear_sample", 84.0 * share / (1 - share)))
        total = sum(ms for _, ms in ops)
        op_csv = "name,calls,self_cpu_ms,self_cuda_ms,cpu_total_ms,share\n" + "".join(
            f"{n},10,{ms:.3f},0,{ms * 1.1:.3f},{ms / total:.4f}\n" for n, ms in ops
        )
        grid = {"data.train_size": size, "seed": s}
        runs.append(
            query.FixtureRun(
                name=f"{variant}/data.train_size={size}/seed={s}",
                tags={
                    tracking_names.VARIANT: variant,
                    tracking_names.GROUP: f"{variant} · data.train_size={size}",
                    tracking_names.GRID: __import__("json").dumps(grid),
                    tracking_names.SEED: str(s),
                    tracking_names.CONFIG_HASH: f"{variant}-{size}-{s}",
                    **({tracking_names.BASELINE: "true"} if variant == "conv" else {}),
                    **ENV_TAGS,
                },
                params={"model.deform_layers": variant, "data.train_size": size, "seed": s, "train.epochs": epochs},
                history=history,
                final=final,
                artifacts={tracking_names.OP_TABLE_ARTIFACT: op_csv, tracking_names.CONFIG_ARTIFACT: f"seed: {s}\n"},
            )
        )
    return runs


def write_synthetic_store(root: Path, n_runs: int = 100, epochs: int = 50) -> str:
    """Write the synthetic ablation `bench_report` into `root`/mlflow.db; return the tracking URI."""
    uri = f"sqlite:///{root.resolve()}/mlflow.db"
    query.write_fixture_runs(
        uri,
        "bench_report",
        synthetic_runs(n_runs, epochs),
        description=f"synthetic: {n_runs} runs × {epochs} epochs",
        baseline="conv",
        artifact_location=(root.resolve() / "mlartifacts").as_uri(),
        parent_tags=ENV_TAGS,
    )
    return uri


def time_report(uri: str, out_dir: Path, names: list[str] | None = None) -> dict[str, float]:
    """Seconds for each stage of one full `harness report` (HTML) run on the store at `uri`."""
    t0 = time.perf_counter()
    store = query.open_store(uri)
    t1 = time.perf_counter()
    datas = load_ablations(store, names)
    t2 = time.perf_counter()
    write_html_reports(datas, out_dir)
    t3 = time.perf_counter()
    return {"open_s": t1 - t0, "load_s": t2 - t1, "render_s": t3 - t2, "total_s": t3 - t0}


def bench_report(
    n_runs: int = 100,
    epochs: int = 50,
    repeats: int = 3,
    tracking_uri: str | None = None,
    names: list[str] | None = None,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Time `harness report` `repeats` times; returns per-stage medians, every total and the store size.

    Without `tracking_uri` a synthetic store of `n_runs` × `epochs` is written to a temporary directory
    first (not timed).
    """
    say = progress or (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="harness-bench-report-") as tmp:
        root = Path(tmp)
        uri = tracking_uri
        write_s = None
        if uri is None:
            say(f"writing {n_runs} synthetic runs × {epochs} epochs")
            t = time.perf_counter()
            uri = write_synthetic_store(root, n_runs, epochs)
            write_s = time.perf_counter() - t
        timings = []
        for i in range(repeats):
            say(f"report {i + 1}/{repeats}")
            timings.append(time_report(uri, root / f"reports-{i}", names))
        html = sorted((root / "reports-0").glob("*.html"))
        size = sum(p.stat().st_size for p in html)
    median = {k: float(np.median([t[k] for t in timings])) for k in timings[0]}
    return {
        "tracking_uri": tracking_uri or f"synthetic ({n_runs} runs × {epochs} epochs)",
        "runs": n_runs if tracking_uri is None else None,
        "epochs": epochs if tracking_uri is None else None,
        "write_s": write_s,
        "median": median,
        "totals_s": [t["total_s"] for t in timings],
        "html_bytes": size,
    }
