"""Metric names grouped by prefix (val/map, best/val/map, cost/params): a store written before the prefixes,
with flat names (val_map, best_val_map, params), reads exactly like one written now; and `harness report`
leaves each ablation's page on its parent runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.report.data import group_stats, load_ablations
from harness.report.render import comparison_markdown
from harness.tracking import names, query

from .conftest import ReportStore, flat_name, placement_children, write_ablation


def _fresh_store(report_store: ReportStore, tmp_path: Path) -> str:
    """An empty, migrated sqlite store of this test's own (a copy of the session's empty one)."""
    shutil.copy(report_store.empty_uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_names_round_trip() -> None:
    for new, old in (("best/val/map", "best_val_map"), ("final/val/loss", "final_val_loss"), ("val/map", "val_map"),
                     ("test/map_small", "test_map_small"), ("chance/micro_f1", "chance_micro_f1"),
                     ("ood/map", "ood_map"), ("train/loss", "train_loss"), ("train/lr", "lr"),
                     ("cost/epoch_time_s", "epoch_time_s"), ("cost/params", "params"), ("best/epoch", "best_epoch"),
                     ("best/selected_epoch", "selected_epoch"), ("data/val_images", "val_images"),
                     ("tune/objective", "objective")):
        assert names.legacy_name(new) == old and names.logged_name(old) == new
        assert names.logged_name(new) == new  # a current name stays as it is
    for unchanged in ("robust/rotation/30/map", "offset/conv3/mean_abs", "erf/radius", "system/cpu_memory"):
        assert names.legacy_name(unchanged) == names.logged_name(unchanged) == unchanged
    assert names.with_logged_names({"val_map": 0.1, "val/map": 0.2, "lr": 0.3}) == {"val/map": 0.2, "train/lr": 0.3}
    assert names.logged_name("val_map") == names.VAL_MAP  # search.objective.metric's spelling


def test_flat_store_reads_like_a_current_one(report_store: ReportStore, tmp_path: Path) -> None:
    uri = _fresh_store(report_store, tmp_path)
    art = tmp_path / "mlartifacts"
    write_ablation(uri, art, "current", "placement", "conv", placement_children())
    flat = write_ablation(uri, art, "flat", "placement", "conv", placement_children(), flat=True)
    store = query.open_store(uri)
    stored = store.client.get_run(flat["conv/data.train_size=250/seed=1"]["run_id"]).data.metrics
    assert "best_val_map" in stored and "val_map" in stored and "params" in stored and "best/val/map" not in stored
    assert flat_name("cost/mean_epoch_time_s") in stored

    new, old = load_ablations(store, ["current", "flat"], with_artifacts=False)
    metric_columns = [c for c in new.runs.columns if "/" in c and not c.startswith("harness.")]
    assert names.best_of(names.VAL_MAP) in metric_columns and names.PARAMS in metric_columns
    assert sorted(c for c in old.runs.columns if "/" in c and not c.startswith("harness.")) == sorted(metric_columns)
    by_name = [d.runs.set_index("run_name").sort_index()[metric_columns] for d in (new, old)]
    pd.testing.assert_frame_equal(by_name[0], by_name[1])

    def named(data):  # histories keyed by run name (run ids differ between the two experiments)
        runs = dict(zip(data.runs["run_id"], data.runs["run_name"], strict=True))
        frame = data.histories.assign(run=data.histories["run_id"].map(runs))
        return frame.drop(columns=["run_id", "timestamp"]).sort_values(["run", "key", "step"]).reset_index(drop=True)

    assert set(old.histories["key"]) == {names.TRAIN_LOSS, names.VAL_LOSS, names.VAL_MICRO_F1, names.VAL_MAP}
    pd.testing.assert_frame_equal(named(new), named(old))
    pd.testing.assert_frame_equal(group_stats(new), group_stats(old))
    assert comparison_markdown([old]).replace("## flat", "## current") == comparison_markdown([new])


def test_a_store_with_both_spellings_prefers_the_current_one(report_store: ReportStore, tmp_path: Path) -> None:
    """A run resumed after the rename holds both: the current spelling wins, in run metrics and histories."""
    from mlflow.entities import Metric

    uri = _fresh_store(report_store, tmp_path)
    written = write_ablation(uri, tmp_path / "art", "mixed", "", None, placement_children()[:1], flat=True)
    store = query.open_store(uri)
    run_id = written["conv/data.train_size=250/seed=1"]["run_id"]
    store.client.log_batch(run_id, metrics=[Metric("val/map", 0.75, 0, 1), Metric("best/val/map", 0.8, 0, 0)])
    runs = query.search_runs(store, [store.client.get_experiment_by_name("mixed").experiment_id])
    assert runs.loc[0, "metrics.best/val/map"] == 0.8 and "metrics.best_val_map" not in runs
    hist = query.metric_histories(store, [run_id], [names.VAL_MAP])
    assert list(hist["step"]) == [1] and list(hist["value"]) == [pytest.approx(0.75)]


def test_report_is_logged_on_the_parent_runs(report_store: ReportStore, tmp_path: Path, capsys) -> None:
    uri = _fresh_store(report_store, tmp_path)
    write_ablation(uri, tmp_path / "art", "placed", "", "conv", placement_children())
    store = query.open_store(uri)
    experiment = store.client.get_experiment_by_name("placed").experiment_id
    parents = store.client.search_runs([experiment], filter_string="tags.`harness.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"  # one child failed

    assert main(["report", "placed", "--tracking-uri", uri, "--out", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert f"logged on 1 parent run(s) as {names.report_artifact('placed')}" in out
    parent = store.client.get_run(parents[0].info.run_id)
    assert parent.info.status == "FAILED" and parent.info.end_time == parents[0].info.end_time
    listed = [f.path for f in store.client.list_artifacts(parent.info.run_id, names.REPORT_ARTIFACT_DIR)]
    assert listed == [names.report_artifact("placed")] == ["report/placed.html"]
    logged = Path(store.client.download_artifacts(parent.info.run_id, listed[0], str(tmp_path / "dl")))
    assert logged.read_text(encoding="utf-8") == (tmp_path / "site" / "placed.html").read_text(encoding="utf-8")

    assert main(["report", "placed", "--tracking-uri", uri, "--out", str(tmp_path / "again"), "--no-attach"]) == 0
    assert "logged on" not in capsys.readouterr().out
    assert names.report_artifact("a/b <c>") == "report/a_b__c_.html"
