"""harness.tracking.query on a real sqlite MLflow store (see conftest.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness.errors import HarnessError
from harness.tracking import query


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sqlite:///{tmp}/missing_dir/mlflow.db", "does not exist"),
        ("sqlite:///{tmp}/absent.db", "does not exist"),
        ("sqlite:///{tmp}/junk.db", "not an MLflow"),
        ("sqlite:///{tmp}/empty.db", "not an MLflow"),
        ("http://127.0.0.1:9", "cannot reach"),
        ("{tmp}/no_mlruns_here", "not a directory"),
    ],
)
def test_open_store_errors_create_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str,
                                          message: str) -> None:
    (tmp_path / "junk.db").write_text("this is not sqlite")
    with sqlite3.connect(tmp_path / "empty.db") as conn:
        conn.execute("CREATE TABLE other (x)")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(HarnessError, match=message) as err:
        query.open_store(uri.format(tmp=tmp_path))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no mlruns/ appeared
    with sqlite3.connect(tmp_path / "empty.db") as conn:  # not turned into an MLflow store
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["other"]


def test_reading_leaves_cwd_alone(report_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = query.open_store(report_store.uri)
    exps = query.harness_experiments(store)
    query.artifact_tables(store, list(query.search_runs(store, list(exps.experiment_id))["run_id"]),
                          "profile/op_table.csv")
    assert list(tmp_path.iterdir()) == []


def test_harness_experiments_skip_default(report_store) -> None:
    store = query.open_store(report_store.uri)
    names = list(query.harness_experiments(store)["name"])
    assert names == sorted(report_store.written)
    assert "Default" in list(query.experiments(store)["name"])
    row = query.experiments(store).set_index("name").loc["dcn_placement"]
    assert row["baseline"] == "conv" and row["description"] == "Where do deformable layers help?"


def test_search_runs_returns_children_only(report_store) -> None:
    store = query.open_store(report_store.uri)
    exp = query.experiments(store).set_index("name").loc["dcn_placement", "experiment_id"]
    runs = query.search_runs(store, [exp])
    written = report_store.written["dcn_placement"]
    assert sorted(runs["run_name"]) == sorted(written)
    assert set(runs["tags.harness.role"]) == {"child"}
    assert sorted(runs["status"].unique()) == ["FAILED", "FINISHED", "RUNNING"]
    one = runs.set_index("run_name").loc["conv/data.train_size=250/seed=2"]
    expected = written["conv/data.train_size=250/seed=2"]["values"]["final"]["best/val/map"]
    assert one["metrics.best/val/map"] == pytest.approx(expected)
    assert one["params.data.train_size"] == "250"
    parents = query.search_runs(store, [exp], role="parent")
    assert len(parents) == 1


def test_metric_histories_bulk_equals_per_run_history(report_store) -> None:
    store = query.open_store(report_store.uri)
    written = report_store.written["dcn_placement"]
    ids = [w["run_id"] for w in written.values()]
    hist = query.metric_histories(store, ids, ["val/map", "train/loss"])
    client = MlflowClient(tracking_uri=report_store.uri)
    for rid in ids[:4] + ids[-2:]:
        for key in ("val/map", "train/loss"):
            mine = hist[(hist.run_id == rid) & (hist.key == key)]
            theirs = sorted(client.get_metric_history(rid, key), key=lambda m: m.step)
            assert list(mine["step"]) == [m.step for m in theirs]
            assert list(mine["value"]) == pytest.approx([m.value for m in theirs])
    name = "deform_first2/data.train_size=250/seed=1"
    got = hist[(hist.run_id == written[name]["run_id"]) & (hist.key == "val/map")]["value"]
    assert list(got) == pytest.approx(written[name]["values"]["history"]["val/map"])


class _NoBulkClient:
    """An MlflowClient seen without its bulk store method: exercises the per-run fallback path."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def get_metric_history(self, run_id: str, key: str):
        return self._client.get_metric_history(run_id, key)


def test_metric_histories_fallback_path(report_store) -> None:
    store = query.open_store(report_store.uri)
    ids = [w["run_id"] for w in report_store.written["xss"].values()]
    bulk = query.metric_histories(store, ids, ["val/loss"])
    slow = query.metric_histories(query.Store(store.uri, _NoBulkClient(store.client)), ids, ["val/loss"])
    assert bulk[["run_id", "step", "value"]].equals(slow[["run_id", "step", "value"]])
    assert len(bulk) == 4 * 5 + 2  # 4 finished runs × 5 epochs, the failed one logged 2


def test_artifact_tables_local_and_download(report_store) -> None:
    store = query.open_store(report_store.uri)
    exp = query.experiments(store).set_index("name").loc["dcn_placement", "experiment_id"]
    runs = query.search_runs(store, [exp])
    ids = list(runs["run_id"])
    uris = dict(zip(runs["run_id"], runs["artifact_uri"], strict=True))
    local = query.artifact_tables(store, ids, "profile/op_table.csv", uris)
    downloaded = query.artifact_tables(store, ids, "profile/op_table.csv")  # through client.download_artifacts
    assert local.sort_values(["run_id", "name"]).reset_index(drop=True).equals(
        downloaded.sort_values(["run_id", "name"]).reset_index(drop=True)
    )
    finished = set(runs.loc[runs.status == "FINISHED", "run_id"])
    assert set(local["run_id"]) == finished  # failed/running runs have no op table: skipped
    assert {"name", "calls", "self_cpu_ms", "self_cuda_ms", "cpu_total_ms", "share"} <= set(local.columns)
    assert query.read_artifact_csv(store, ids[0], "profile/nope.csv") is None
