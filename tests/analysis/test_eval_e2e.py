"""End to end: `harness run` a tiny ablation, `harness eval` it, and check what reached MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import RunConfig


def _children(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'child'")
    return client, {r.data.tags["harness.variant"]: r for r in runs}


def test_eval_logs_robustness_offsets_sampling_erf(trained):
    client, runs = _children(trained.uri, trained.experiment)
    assert set(runs) == {"standard", "deform", "shared"}
    for variant, run in runs.items():
        m = run.data.metrics
        assert run.info.status == "FINISHED", "eval must not change a run's status"
        assert json.loads(run.data.tags["harness.analysis"])["parts"] == ["robustness", "offsets", "sampling", "erf"]
        # the identity magnitude is the plain val set: the same number fit's last evaluation logged
        for family, ident in (("rotation", "0"), ("scale", "1"), ("stretch", "1"), ("shear", "0")):
            assert m[f"robust/{family}/{ident}/map"] == m["final/val/map"], (variant, family)
            assert m[f"robust/{family}/{ident}/micro_f1"] == m["final/val/micro_f1"]
        for mag in ("15", "30", "45", "60", "90"):
            assert 0.0 <= m[f"robust/rotation/{mag}/map"] <= 1.0
        assert "robust/scale/0.5/map" in m and "robust/rotation/mean_map_drop" in m
        assert m["erf/rms_radius_px"] > 0 and 0 < m["erf/area90_frac"] <= 1 and m["erf/layer"] == 2
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
        assert {"analysis/robustness.csv", "analysis/erf.npy", "analysis/erf.png"} <= artifacts
        deformable = variant != "standard"
        assert ("analysis/sampling.png" in artifacts) == deformable
        assert ("analysis/offset_hist.csv" in artifacts) == deformable
        assert ("offset/conv0/mean_abs" in m) == deformable
        assert "offset/conv2/mean_abs" not in m  # conv2 is an ordinary conv
    # the shared layout can only move the kernel: effective dilation exactly the conv's, no tap spread
    shared, deform = runs["shared"].data.metrics, runs["deform"].data.metrics
    for layer in (0, 1):
        assert shared[f"offset/conv{layer}/eff_dilation"] == 1.0
        assert shared[f"offset/conv{layer}/tap_spread"] == 0.0
        assert shared[f"offset/conv{layer}/mean_abs"] > 0
        assert deform[f"offset/conv{layer}/tap_spread"] > 0
        assert deform[f"offset/conv{layer}/eff_dilation"] != 1.0
        shares = [deform[f"offset/conv{layer}/{r}/share"] for r in ("background", "small", "medium", "large")]
        assert sum(shares) == pytest.approx(1.0)


def test_eval_one_run_by_id_and_parts(trained, capsys):
    client, runs = _children(trained.uri, trained.experiment)
    run_id = runs["deform"].info.run_id
    args = ["eval", run_id, "--only", "erf", "--erf-images", "4", "--tracking-uri", trained.uri,
            "--results-dir", str(trained.results)]
    assert main(args) == 0
    assert "1 run(s) analysed" in capsys.readouterr().out
    tag = json.loads(client.get_run(run_id).data.tags["harness.analysis"])
    assert tag["parts"] == ["erf"]


@pytest.mark.parametrize(
    "target,extra,message",
    [
        ("0123456789abcdef0123456789abcdef", [], "no ablation or run '0123456789abcdef0123456789abcdef'"),
        ("no_such_ablation", [], "no ablation or run 'no_such_ablation'"),
        ("empty_ablation", [], "ablation 'empty_ablation' has no runs"),
        ("tiny_analysis", ["--only", "everything"], "--only 'everything'"),
    ],
)
def test_bad_input_is_one_line(trained, capsys, tmp_path, target, extra, message):
    MlflowClient(trained.uri).get_experiment_by_name("empty_ablation") or MlflowClient(trained.uri).create_experiment(
        "empty_ablation")
    extra = [*extra, "--results-dir", str(trained.results)]
    code = main(["eval", target, "--tracking-uri", trained.uri, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_eval_from_another_results_dir_uses_the_checkpoint_artifact(trained, capsys, tmp_path):
    client, runs = _children(trained.uri, trained.experiment)
    run_id = runs["deform"].info.run_id
    args = ["eval", run_id, "--only", "offsets", "--tracking-uri", trained.uri,
            "--results-dir", str(tmp_path / "empty")]
    assert main(args) == 0, capsys.readouterr().err
    assert "1 run(s) analysed" in capsys.readouterr().out


def test_missing_store_is_one_line(tmp_path, capsys):
    code = main(["eval", "x", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"])
    err = capsys.readouterr().err
    assert code == 2 and "no MLflow store" in err
    assert not (tmp_path / "none.db").exists()


def test_post_training_hook_runs_only_when_asked(tmp_path, synth_root, monkeypatch):
    from tests.analysis.conftest import write_ablation

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    file = write_ablation(tmp_path / "hook.yaml", synth_root, name="hook",
                          variants='  deform: {model: {deform_layers: "first:1"}}\n', baseline="deform")
    assert not RunConfig().analysis.enabled
    args = ["run", str(file), "--no-profile", "--tracking-uri", uri, "--results-dir", str(tmp_path / "r"),
            "--set", "analysis.enabled=true"]
    assert main(args) == 0
    _, runs = _children(uri, "hook")
    m = runs["deform"].data.metrics
    assert runs["deform"].info.status == "FINISHED"
    assert "harness.analysis_failure" not in runs["deform"].data.tags
    assert m["robust/rotation/0/map"] == m["final/val/map"]
    assert "offset/conv0/eff_dilation" in m and "erf/rms_radius_px" in m
    assert Path(tmp_path / "r").is_dir()
