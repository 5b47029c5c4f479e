"""`harness tune` end to end: real Optuna and MLflow sqlite stores in tmp_path, tiny synthetic data.

The main search is made deterministic with enqueued trials: #0 trains at a sane rate (COMPLETE), #1 at
1e-6 is worse than #0 at epoch 1 and the median pruner (one startup trial) stops it (PRUNED), #2 at
1e12 makes the loss NaN (FAIL).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import SEARCH_METRICS
from harness.errors import HarnessError
from harness.metrics import HIGHER_IS_BETTER
from harness.tracking.studies import best_lr_from_study, study_frames, study_names

STATE = optuna.trial.TrialState
GOOD_LR = 0.003

SEARCH = """
search:
  lr: {low: 1.0e-6, high: 1.0e12, log: true}
  objective: {metric: val_loss, direction: minimize}
  n_trials: 3
  sampler: {name: tpe, seed: 0}
  pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
  enqueue: [{lr: 0.003}, {lr: 1.0e-6}, {lr: 1.0e12}]
"""


def ablation(path: Path, root: Path, search: str = SEARCH, name: str = "tiny", train: str = "lr: 0.003") -> Path:
    path.write_text(f"""
name: {name}
baseline: standard
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3, width: 0.5}}
  train: {{epochs: 2, batch_size: 16, {train}}}
  profile: {{enabled: false}}
variants:
  standard: {{model: {{deform_layers: none}}}}
grid:
  seed: [0]
{search}
""")
    return path


def tune_args(file: Path, storage: str, uri: str, results: Path, *extra: str) -> list[str]:
    return ["tune", str(file), "--storage", storage, "--tracking-uri", uri, "--results-dir", str(results), *extra]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, synth_root):
    """One tune of the deterministic 3-trial search; its paths, exit status and output."""
    tmp = tmp_path_factory.mktemp("tuned")
    storage, uri = f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db"
    file = ablation(tmp / "tiny.yaml", synth_root)
    args = tune_args(file, storage, uri, tmp / "results")
    started = time.perf_counter()
    code = main(args)
    return {"tmp": tmp, "storage": storage, "uri": uri, "file": file, "args": args, "code": code,
            "seconds": time.perf_counter() - started}


def trials(storage: str, name: str = "tiny.standard") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def mlflow_runs(uri: str, experiment: str = "tiny", role: str | None = None):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`harness.role` = '{role}'" if role else ""
    return client, client.search_runs([exp.experiment_id], query, max_results=1000)


def test_search_metrics_are_the_val_metrics_fit_reports():
    assert set(SEARCH_METRICS) == {f"val_{k}" for k in HIGHER_IS_BETTER}


def test_trials_keep_their_true_states_in_optuna(tuned):
    assert tuned["code"] == 0
    by_number = {t.number: t for t in trials(tuned["storage"])}
    assert [by_number[n].state for n in range(3)] == [STATE.COMPLETE, STATE.PRUNED, STATE.FAIL]
    complete, pruned, failed = by_number[0], by_number[1], by_number[2]
    assert complete.params == {"lr": GOOD_LR} and sorted(complete.intermediate_values) == [1, 2]
    assert complete.value == min(complete.intermediate_values.values())  # best over epochs, minimised
    assert sorted(pruned.intermediate_values) == [1] and pruned.user_attrs["harness.pruned_at_epoch"] == 1
    assert "DivergedError: diverged at epoch 1" in failed.user_attrs["harness.failure"]
    assert failed.system_attrs["fail_reason"] == failed.user_attrs["harness.failure"]
    assert best_lr_from_study("tiny.standard", tuned["storage"]) == GOOD_LR


def test_mlflow_has_a_study_run_and_nested_trial_runs_with_true_states(tuned):
    client, runs = mlflow_runs(tuned["uri"])
    roles = sorted(r.data.tags["harness.role"] for r in runs)
    assert roles == ["study", "trial", "trial", "trial"]  # no harness.role=child: report/resume ignore them
    study = next(r for r in runs if r.data.tags["harness.role"] == "study")
    assert study.data.tags["harness.study"] == "tiny.standard" and study.info.status == "FINISHED"
    assert float(study.data.tags["harness.best_lr"]) == GOOD_LR
    assert study.data.tags["harness.best_trial"] == "0"
    best = next(t for t in trials(tuned["storage"]) if t.number == 0)
    assert float(study.data.tags["harness.best_value"]) == pytest.approx(best.value)
    by_number = {int(r.data.tags["harness.trial_number"]): r for r in runs if r.data.tags["harness.role"] == "trial"}
    expected = {0: ("FINISHED", "COMPLETE"), 1: ("KILLED", "PRUNED"), 2: ("FAILED", "FAIL")}
    for number, (status, state) in expected.items():
        run = by_number[number]
        assert (run.info.status, run.data.tags["harness.trial_state"]) == (status, state), number
        assert run.data.tags["mlflow.parentRunId"] == study.info.run_id
        assert run.data.tags["harness.study"] == "tiny.standard"
        assert float(run.data.params["lr"]) == float(run.data.params["train.lr"])
    assert "DivergedError: diverged at epoch 1" in by_number[2].data.tags["harness.failure"]
    assert [m.step for m in client.get_metric_history(by_number[0].info.run_id, "val/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(by_number[1].info.run_id, "val/loss")] == [1]
    assert by_number[0].data.metrics["tune/objective"] == pytest.approx(best.value)
    optuna_ids = {t.number: t.user_attrs["harness.mlflow_run_id"] for t in trials(tuned["storage"])}
    assert all(optuna_ids[n] == by_number[n].info.run_id for n in range(3))


def test_study_frames_give_lr_objective_and_history(tuned):
    frames = study_frames(tuned["storage"])
    assert list(frames) == ["tiny.standard"] == study_names(tuned["storage"])
    frame = frames["tiny.standard"].head(3)
    assert list(frame["number"]) == [0, 1, 2]
    assert list(frame["state"]) == ["COMPLETE", "PRUNED", "FAIL"]
    assert frame["params_lr"].iloc[0] == GOOD_LR and frame["value"].iloc[0] > 0
    assert sorted(frame["intermediate_values"].iloc[0]) == [1, 2]
    attrs = frames["tiny.standard"].attrs
    assert attrs["metric"] == "val_loss" and attrs["direction"] == "minimize"
    assert attrs["best_params"] == {"lr": GOOD_LR} and attrs["best_trial"] == 0
    with pytest.raises(HarnessError, match="no Optuna study 'nope'"):
        study_frames(tuned["storage"], ["nope"])


def test_rerun_resumes_counting_existing_trials(tuned, capsys):
    storage = tuned["storage"]
    capsys.readouterr()
    assert main(tuned["args"]) == 0  # 3 of 3 trials exist: nothing runs
    assert "nothing to run" in capsys.readouterr().out
    assert len(trials(storage)) == 3

    # a trial left RUNNING by a worker that died on this host: failed as interrupted, not counted
    study = optuna.load_study(study_name="tiny.standard", storage=storage)
    ghost = study.ask({"lr": optuna.distributions.FloatDistribution(1e-6, 1e12, log=True)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost.set_user_attr("harness.host", socket.gethostname())
    ghost.set_user_attr("harness.pid", dead.pid)

    assert main([*tuned["args"], "--n-trials", "4"]) == 0
    after = {t.number: t for t in trials(storage)}
    assert after[3].state == STATE.FAIL and after[3].user_attrs["harness.interrupted"] is True
    assert sorted(after) == [0, 1, 2, 3, 4] and after[4].state in (STATE.COMPLETE, STATE.PRUNED, STATE.FAIL)
    assert main([*tuned["args"], "--n-trials", "4"]) == 0
    assert len(trials(storage)) == 5
    _, runs = mlflow_runs(tuned["uri"], role="study")
    assert len(runs) == 1  # one parent run per study, reopened by each worker


def test_from_study_trains_with_the_best_rate(tuned, synth_root, harness_env):
    harness_env(optuna_storage=tuned["storage"])
    tmp = tuned["tmp"]
    file = ablation(tmp / "reuse.yaml", synth_root, search="", name="reuse", train="lr: {from_study: tiny.standard}")
    assert main(["run", str(file), "--tracking-uri", tuned["uri"], "--results-dir", str(tmp / "results"),
                 "--no-profile"]) == 0
    _, runs = mlflow_runs(tuned["uri"], experiment="reuse", role="child")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train/lr_used"] == pytest.approx(GOOD_LR)
    assert float(runs[0].data.params["train.lr"]) == pytest.approx(GOOD_LR)  # resolved before the hash
    assert runs[0].data.tags["harness.lr_from_study"] == "tiny.standard"
    # the study and trial runs do not count as children of the tuned ablation either
    _, children = mlflow_runs(tuned["uri"], role="child")
    assert children == []


def test_best_lr_from_study_errors(tmp_path, harness_env):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    with pytest.raises(HarnessError, match="no Optuna storage at"):
        best_lr_from_study("x", storage)
    study = optuna.create_study(study_name="only-failed", storage=storage)
    study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}), state=STATE.FAIL)
    with pytest.raises(HarnessError, match="no Optuna study 'missing'.*only-failed"):
        best_lr_from_study("missing", storage)
    with pytest.raises(HarnessError, match="'only-failed' has no completed trial yet \\(1 fail\\)"):
        best_lr_from_study("only-failed", storage)
    harness_env(optuna_storage=storage)
    with pytest.raises(HarnessError, match="no completed trial"):
        best_lr_from_study("only-failed")


def test_two_worker_processes_share_one_study(tmp_path, synth_root):
    """Two `harness tune` processes (one of them with two threads) on one sqlite storage: 4 trials in all."""
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    search = SEARCH.replace("n_trials: 3", "n_trials: 4").replace(
        "  enqueue: [{lr: 0.003}, {lr: 1.0e-6}, {lr: 1.0e12}]\n", ""
    ).replace("1.0e12", "1.0e-1")
    file = ablation(tmp_path / "tiny.yaml", synth_root, search=search)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    commands = [
        [sys.executable, "-m", "harness", *tune_args(file, storage, uri, tmp_path / "results")],
        [sys.executable, "-m", "harness", *tune_args(file, storage, uri, tmp_path / "results", "--n-jobs", "2")],
    ]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    found = trials(storage)
    print("trials per worker pid:", sorted((t.user_attrs["harness.pid"], t.number) for t in found))
    assert sorted(t.number for t in found) == [0, 1, 2, 3]  # none lost, none run twice
    assert all(t.state in (STATE.COMPLETE, STATE.PRUNED, STATE.FAIL) for t in found)
    assert len({t.params["lr"] for t in found}) == 4  # each trial sampled its own rate
    client, runs = mlflow_runs(uri)
    studies = [r for r in runs if r.data.tags["harness.role"] == "study"]
    trial_runs = [r for r in runs if r.data.tags["harness.role"] == "trial"]
    assert len(studies) == 1 and studies[0].info.status in ("FINISHED", "FAILED")
    assert sorted(int(r.data.tags["harness.trial_number"]) for r in trial_runs) == [0, 1, 2, 3]
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    by_id = {r.info.run_id: r for r in trial_runs}
    for t in found:
        run = by_id[t.user_attrs["harness.mlflow_run_id"]]
        assert run.info.status == status[t.state.name] and run.data.tags["harness.trial_state"] == t.state.name
        assert float(run.data.params["lr"]) == t.params["lr"]


@pytest.mark.parametrize(
    "search,args,message",
    [
        (SEARCH.replace("low: 1.0e-6, high: 1.0e12", "low: 1.0e-2, high: 1.0e-4"), [],
         "search.lr: empty or inverted range"),
        (SEARCH.replace("low: 1.0e-6, high: 1.0e12", "low: 1.0e-3, high: 1.0e-3"), [],
         "search.lr: empty or inverted range"),
        (SEARCH.replace("low: 1.0e-6", "low: 0.0"), [], "a log range needs low > 0"),
        (SEARCH.replace("metric: val_loss", "metric: val_acc"), [], "unknown metric 'val_acc'; valid: val_loss"),
        (SEARCH.replace("name: median", "name: sometimes"), [], "search.pruner"),
        (SEARCH.replace("{lr: 1.0e12}", "{lr: 1.0e13}"), [], "enqueue[2]: lr=1e+13 is outside its range"),
        ("", [], "no `search:` section"),
        (SEARCH, ["--set", "search.objective.metric=accuracy"], "unknown metric 'accuracy'"),
        (SEARCH, ["--n-trials", "0"], "--n-trials 0"),
        (SEARCH, ["--only", "nothing"], "--only 'nothing' matches no run"),
        (SEARCH, ["--storage", "postgresql://u:secret@127.0.0.1:9/db"], "cannot open Optuna storage postgresql://u:***@"),
        (SEARCH, ["--storage", "sqlite:///{tmp}/afile/sub/optuna.db"], "cannot create"),
        (SEARCH, ["--storage", "redis://127.0.0.1:9"], "unsupported Optuna storage"),
    ],
    ids=["inverted-range", "empty-range", "log-from-zero", "unknown-metric", "unknown-pruner", "enqueue-outside",
         "no-search", "set-unknown-metric", "zero-trials", "only-nothing", "postgres-unreachable",
         "sqlite-uncreatable", "unsupported-storage"],
)
def test_bad_input_is_one_line_exit_2(tmp_path, synth_root, capsys, search, args, message):
    (tmp_path / "afile").write_text("not a directory")
    file = ablation(tmp_path / "bad.yaml", synth_root, search=search)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    storage = [] if "--storage" in args else ["--storage", f"sqlite:///{tmp_path}/optuna.db"]
    code = main(["tune", str(file), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *storage, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "secret" not in err
    assert not (tmp_path / "mlflow.db").exists()


def test_changing_the_objective_of_an_existing_study_is_refused(tuned, capsys):
    code = main([*tuned["args"], "--set", "search.objective.metric=val_map"])
    err = capsys.readouterr().err
    assert code == 2 and "optimises val_loss (minimize)" in err, err


def test_search_overrides_and_shorthands(tuned):
    from harness.planning import load_ablation
    from harness.tune import resolve_search

    spec = load_ablation(tuned["file"])
    search = resolve_search(spec, {"pruner": "none", "n_trials": 7, "batch_size": {"choices": [8, 16]}})
    assert search.pruner.name == "none" and search.n_trials == 7 and search.batch_size.choices == [8, 16]
    assert list(search.space) == ["lr", "batch_size"]
    assert json.loads(search.model_dump_json())["objective"]["metric"] == "val_loss"
    default = load_ablation(Path(__file__).resolve().parents[2] / "ablations" / "lr_search.yaml")
    assert default.search is not None and default.search.objective.goal == "maximize"


def test_report_shows_studies_from_mlflow(tuned):
    out = tuned["tmp"] / "reports"
    assert main(["report", "tiny", "--tracking-uri", tuned["uri"], "--out", str(out)]) == 0
    html = (out / "tiny.html").read_text()
    assert "Learning-rate searches (Optuna)" in html
    row = html[html.index('id="studies-table"'):]
    row = row[row.index("<tbody>"):row.index("</tbody>")]
    cells = [c.rsplit(">", 1)[1] for c in row.split("</td>")[:-1]]
    assert cells[:3] == ["tiny.standard", "standard", "minimize val_loss"]
    # the report reads MLflow: count the trial runs' states there (other tests of this module add trials)
    _, runs = mlflow_runs(tuned["uri"], role="trial")
    states = [r.data.tags["harness.trial_state"] for r in runs]
    assert cells[3:6] == [str(states.count(s)) for s in ("COMPLETE", "PRUNED", "FAIL")]
    assert states.count("COMPLETE") >= 1 and states.count("PRUNED") >= 1 and states.count("FAIL") >= 1
    assert float(cells[6]) == pytest.approx(GOOD_LR)
    assert "learning rate (log)" in html and "optimisation history" in html
