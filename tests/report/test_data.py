"""harness.report.data: per-group statistics checked against numbers computed here from what was written."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats as st

from harness.errors import HarnessError
from harness.report.data import (
    COST_COLUMNS,
    best_rows,
    curve_stats,
    environment,
    group_stats,
    load_ablations,
    op_summary,
    table_columns,
)
from harness.tracking import query

from .conftest import OOM, ReportStore


@pytest.fixture(scope="module")
def placement(report_store: ReportStore):
    store = query.open_store(report_store.uri)
    (data,) = load_ablations(store, ["dcn_placement"])
    return data


def _finished(report_store: ReportStore, variant: str, size: int) -> dict[int, dict]:
    out = {}
    for info in report_store.written["dcn_placement"].values():
        spec = info["spec"]
        if (spec.variant, spec.grid["data.train_size"], spec.status) == (variant, size, "FINISHED"):
            out[spec.seed] = info["values"]
    return out


def test_runs_are_normalized(placement) -> None:
    runs = placement.runs.set_index("run_name")
    assert placement.baseline == "conv" and placement.baseline_source.startswith("experiment tag")
    assert placement.grid_axes == ["data.train_size"]
    assert placement.count("finished") == 17 and placement.count("failed") == 1 and placement.count("running") == 1
    failed = runs.loc["deform_all/data.train_size=1000/seed=3"]
    assert (failed["state"], failed["failure"]) == ("failed", OOM)
    running = runs.loc["deform_first2/data.train_size=250/seed=4"]
    assert running["state"] == "running" and running["seed"] == 4
    assert running["group"] == "deform_first2 · data.train_size=250"
    assert running["grid_point"] == "data.train_size=250"


def test_group_means_and_std_match_written_values(placement, report_store: ReportStore) -> None:
    table = group_stats(placement).set_index("group")
    for variant in ("conv", "deform_first2", "deform_all"):
        for size in (250, 1000):
            runs = _finished(report_store, variant, size)
            row = table.loc[f"{variant} · data.train_size={size}"]
            assert row["n_finished"] == len(runs)
            for key in ("best/val/map", "final/val/micro_f1", "final/val/loss", "cost/mean_epoch_time_s",
                        "cost/peak_rss_mb"):
                vals = [v["final"][key] for v in runs.values()]
                assert row[f"{key}_mean"] == pytest.approx(statistics.mean(vals)), key
                assert row[f"{key}_std"] == pytest.approx(statistics.stdev(vals)), key


def test_failed_and_running_runs_are_counted_not_averaged(placement, report_store: ReportStore) -> None:
    table = group_stats(placement).set_index("group")
    oom = table.loc["deform_all · data.train_size=1000"]
    assert (oom["n_finished"], oom["n_failed"], oom["n_running"]) == (2, 1, 0)
    assert oom["seeds"] == [1, 2]
    busy = table.loc["deform_first2 · data.train_size=250"]
    assert (busy["n_finished"], busy["n_failed"], busy["n_running"]) == (3, 0, 1)
    # the running run logged 2 epochs of val_map at a much higher level; the curve must not see them
    curves = curve_stats(placement)
    step1 = curves[(curves.group == busy.name) & (curves.key == "val/map") & (curves.step == 1)].iloc[0]
    seeds = _finished(report_store, "deform_first2", 250)
    expected = [v["history"]["val/map"][0] for v in seeds.values()]
    assert step1["n"] == 3
    assert step1["mean"] == pytest.approx(statistics.mean(expected))
    assert step1["std"] == pytest.approx(statistics.stdev(expected))
    assert (step1["min"], step1["max"]) == (pytest.approx(min(expected)), pytest.approx(max(expected)))


def test_delta_vs_baseline_at_same_grid_point(placement, report_store: ReportStore) -> None:
    table = group_stats(placement).set_index("group")
    for size in (250, 1000):
        base = _finished(report_store, "conv", size)
        for variant in ("deform_first2", "deform_all"):
            runs = _finished(report_store, variant, size)
            seeds = sorted(set(runs) & set(base))
            a = [runs[s]["final"]["final/val/map"] for s in seeds]
            b = [base[s]["final"]["final/val/map"] for s in seeds]
            ci = st.ttest_rel(a, b).confidence_interval(0.95)
            row = table.loc[f"{variant} · data.train_size={size}"]
            assert row["delta_final/val/map_method"] == "paired t"
            assert row["delta_final/val/map_n"] == len(seeds)
            assert row["delta_final/val/map"] == pytest.approx(float(np.mean(np.subtract(a, b))))
            assert row["delta_final/val/map_low"] == pytest.approx(ci.low)
            assert row["delta_final/val/map_high"] == pytest.approx(ci.high)
    assert table.loc["deform_all · data.train_size=1000", "delta_final/val/map_n"] == 2  # seed 3 failed


def test_baseline_delta_is_zero_centred(placement) -> None:
    table = group_stats(placement)
    base = table[table["is_baseline"]]
    assert list(base["variant"]) == ["conv", "conv"]
    for col in ("delta_final/val/map", "delta_final/val/map_low", "delta_final/val/map_high"):
        assert list(base[col]) == [0.0, 0.0]
    # rows: grid point order, baseline first within each
    assert list(table["group"])[:3] == ["conv · data.train_size=250", "deform_all · data.train_size=250",
                                        "deform_first2 · data.train_size=250"]


def test_baseline_override(report_store: ReportStore) -> None:
    store = query.open_store(report_store.uri)
    (data,) = load_ablations(store, ["dcn_placement"], baseline="deform_all", with_artifacts=False)
    assert (data.baseline, data.baseline_source) == ("deform_all", "--baseline")
    table = group_stats(data).set_index("group")
    conv = _finished(report_store, "conv", 1000)
    dall = _finished(report_store, "deform_all", 1000)
    diffs = [conv[s]["final"]["final/val/map"] - dall[s]["final"]["final/val/map"] for s in (1, 2)]
    assert table.loc["conv · data.train_size=1000", "delta_final/val/map"] == pytest.approx(statistics.mean(diffs))
    assert table.loc["deform_all · data.train_size=250", "delta_final/val/map"] == 0.0
    with pytest.raises(HarnessError, match="not a variant"):
        load_ablations(store, ["dcn_placement"], baseline="resnet")


def test_no_baseline_means_no_delta(report_store: ReportStore) -> None:
    (data,) = load_ablations(query.open_store(report_store.uri), ["no_baseline"], with_artifacts=False)
    assert data.baseline is None and data.grid_axes == []
    table = group_stats(data)
    assert list(table["group"]) == ["solo"]
    assert math.isnan(table.loc[0, "delta_final/val/map"])
    assert "delta_best/val/map" not in table  # the Δ is on the headline metric, never on best-on-val


def test_unknown_and_empty(report_store: ReportStore) -> None:
    store = query.open_store(report_store.uri)
    with pytest.raises(HarnessError, match="unknown ablation 'nope'.*known: all_failed, dcn_placement"):
        load_ablations(store, ["nope"])
    with pytest.raises(HarnessError, match="'Default' has no harness runs"):
        load_ablations(store, ["Default"])
    with pytest.raises(HarnessError, match="no harness runs"):
        load_ablations(query.open_store(report_store.empty_uri))


def test_best_rows_per_grid_point(placement) -> None:
    table = group_stats(placement)
    cols = {c.key: c for c in table_columns(placement)}
    best_map = best_rows(table, cols["best/val/map"])
    for rank, part in table.groupby("point_rank"):
        winner = part["best/val/map_mean"].idxmax()
        assert winner in best_map, rank
    fastest = best_rows(table, cols["cost/mean_epoch_time_s"])
    assert {table.loc[i, "variant"] for i in fastest} == {"conv"}  # lower is better
    share = next(c for c in COST_COLUMNS if c.key == "cost/profile_deform_share")
    assert best_rows(table, share) == set()  # not a quality: never highlighted


def test_table_columns_pick_one_memory_column(placement) -> None:
    keys = [c.key for c in table_columns(placement)]
    assert "cost/peak_rss_mb" in keys and "cost/peak_cuda_mb" not in keys  # CPU runs: no peak_cuda_mb logged
    assert keys[:2] == ["best/val/map", "final/val/map"]


def test_op_summary_and_environment(placement) -> None:
    ops = op_summary(placement)
    assert sorted(ops) == ["conv", "deform_all", "deform_first2"]
    dall = ops["deform_all"].set_index("name")
    # deform_all: 5 finished runs (250: costs 2.4; 1000: 9.6) -> mean convolution_backward = 120 * mean(cost)
    assert dall.loc["aten::convolution_backward", "ms"] == pytest.approx(120 * (3 * 2.4 + 2 * 9.6) / 5)
    assert dall.loc["harness::deform_bilinear_sample", "deform"]
    assert not dall.loc["aten::addmm", "deform"]
    assert "harness::deform_bilinear_sample" not in set(ops["conv"]["name"])
    assert ops["conv"]["share"].sum() == pytest.approx(1.0)
    env = dict(environment(placement))
    assert env["git commit"] == [("0123456789abcdef0123456789abcdef01234567", 19)]


def test_resumed_step_keeps_the_later_value(report_store: ReportStore) -> None:
    (data,) = load_ablations(query.open_store(report_store.uri), ["no_baseline"], with_artifacts=False)
    rid = report_store.written["no_baseline"]["solo/seed=1"]["run_id"]
    hist = data.histories[(data.histories.run_id == rid) & (data.histories.key == "val/map")]
    assert list(hist["step"]) == [1, 2, 3, 4, 5]
    assert hist["value"].iloc[-1] == 0.999


def test_normalize_runs_fallbacks() -> None:
    import pandas as pd

    from harness.report.data import normalize_runs

    raw = pd.DataFrame(
        [
            {"run_id": "a" * 32, "run_name": "v1/train.lr=0.1/seed=3", "status": "KILLED",
             "tags.harness.stale": "marked KILLED by a later harness run"},
            {"run_id": "b" * 32, "run_name": "v1/train.lr=0.01/seed=3", "status": "FAILED"},
            {"run_id": "c" * 32, "run_name": "v2/train.lr=0.01/seed=1", "status": "SCHEDULED",
             "tags.harness.variant": "v2", "tags.harness.grid": '{"train.lr": 0.01, "seed": 1}'},
        ]
    )
    runs, axes = normalize_runs(raw)
    assert axes == ["train.lr"]
    assert list(runs["state"]) == ["failed", "failed", "running"]
    assert runs.loc[0, "failure"] == "killed: marked KILLED by a later harness run"
    assert "harness.failure missing" in runs.loc[1, "failure"]
    assert list(runs["variant"]) == ["v1", "v1", "v2"]
    assert list(runs["group"]) == ["v1 · train.lr=0.1", "v1 · train.lr=0.01", "v2 · train.lr=0.01"]
    assert list(runs["seed"]) == [3, 3, 1]
    assert list(runs["point_rank"]) == [1, 0, 0]  # grid points ordered by value: 0.01 before 0.1
