"""Ablation files: validation, expansion, hashing, --set, --only, --shard."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import config_hash
from harness.errors import HarnessError
from harness.planning import expand, load_ablation, parse_set, select, shard

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ablation.yaml"
    path.write_text(text)
    return path


BASIC = """
name: demo
description: two variants
base:
  data: {source: coco, root: /data/coco}
  train: {epochs: 3}
variants:
  standard: {model: {deform_layers: none}}
  deform: {model: {deform_layers: "first:2"}}
grid:
  data.train_size: [100, 200]
  seed: [0, 1]
"""


def test_expand_cartesian_product_with_every_variant(tmp_path):
    spec = load_ablation(write(tmp_path, BASIC))
    runs = expand(spec)
    assert len(runs) == 8
    assert runs[0].name == "standard/data.train_size=100/seed=0"
    assert runs[-1].name == "deform/data.train_size=200/seed=1"
    assert {r.config.data.train_size for r in runs} == {100, 200}
    assert [r.config.seed for r in runs[:4]] == [0, 1, 0, 1]
    assert runs[0].config.train.epochs == 3 and runs[4].config.model.deform_layers == "first:2"
    assert runs[0].group == "standard · data.train_size=100"
    assert runs[0].baseline and not runs[4].baseline
    assert len({r.config_hash for r in runs}) == 8


def test_hash_is_stable_and_ignores_execution_keys(tmp_path):
    spec = load_ablation(write(tmp_path, BASIC))
    a = expand(spec)[0]
    b = expand(spec, parse_set(["profile.enabled=false", "train.device=cpu"]))[0]
    c = expand(spec, parse_set(["train.epochs=4"]))[0]
    assert a.config_hash == b.config_hash == config_hash(a.config)
    assert c.config_hash != a.config_hash
    assert len(a.config_hash) == 12


def test_set_overrides_and_grid_replacement(tmp_path):
    spec = load_ablation(write(tmp_path, BASIC))
    runs = expand(spec, parse_set(["train.epochs=2", "grid.seed=[5]", "model.width=0.5"]))
    assert len(runs) == 4
    assert all(r.config.train.epochs == 2 and r.config.seed == 5 and r.config.model.width == 0.5 for r in runs)


def test_data_root_option_and_env(tmp_path, harness_env):
    spec = load_ablation(write(tmp_path, BASIC.replace("root: /data/coco", "image_size: 64")))
    harness_env(coco_root="/env/coco")
    assert expand(spec)[0].config.data.root == "/env/coco"
    assert expand(spec, data_root="/cli/coco")[0].config.data.root == "/cli/coco"


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\nbase: {train: {epochs: [}\n", r"line 2.*YAML syntax error"),
        ("name: x\nbase: {}\nvariants: {a: {model: {deform_layer: all}}}\n", r"model.deform_layer: unknown key"),
        ("name: x\nbase: {train: {epochs: two}}\n", r"train.epochs: .*integer"),
        ("name: x\nbase: {}\ngrid: {seed: []}\n", r"grid axis 'seed' is empty"),
        ("name: x\nvariants: {}\n", r"variants is empty"),
        ("name: x\ncolour: red\n", r"colour: unknown key"),
        ("description: no name\n", r"name: required key is missing"),
        ("name: x\nbaseline: nope\nvariants: {a: {}}\n", r"baseline 'nope' is not a variant"),
        ("name: x\nbase: {model: {arch: resnet}}\n", r"unknown arch 'resnet'"),
        ("name: x\nbase: {data: {random_resized_crop: [0.9, 0.5]}}\n", r"random_resized_crop"),
        ("- a list\n", r"must be a mapping"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(HarnessError, match=message) as info:
        expand(load_ablation(write(tmp_path, text)))
    assert "\n" not in str(info.value)


def test_missing_file():
    with pytest.raises(HarnessError, match="ablation file not found: nope.yaml"):
        load_ablation("nope.yaml")


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..lr=1", "train.lr=[1"])
def test_bad_set(item):
    with pytest.raises(HarnessError, match="bad --set"):
        parse_set([item])


def test_set_type_error_is_reported_with_variant(tmp_path):
    spec = load_ablation(write(tmp_path, BASIC))
    with pytest.raises(HarnessError, match="train.epochs"):
        expand(spec, parse_set(["train.epochs=abc"]))


def test_set_clashing_with_grid_axis(tmp_path):
    spec = load_ablation(write(tmp_path, BASIC))
    with pytest.raises(HarnessError, match="grid.seed"):
        expand(spec, parse_set(["seed=3"]))


def test_only_and_shard(tmp_path):
    runs = expand(load_ablation(write(tmp_path, BASIC)))
    assert {r.variant for r in select(runs, ["deform"])} == {"deform"}
    assert len(select(runs, ["*/seed=1"])) == 4
    with pytest.raises(HarnessError, match="--only 'nothing' matches no run; variants: deform, standard"):
        select(runs, ["nothing"])
    parts = [shard(runs, f"{i}/3") for i in range(3)]
    assert sorted(r.name for p in parts for r in p) == sorted(r.name for r in runs)
    with pytest.raises(HarnessError, match="bad --shard"):
        shard(runs, "3/3")


@pytest.mark.parametrize("path", sorted((ROOT / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_ablations_are_valid(path):
    spec = load_ablation(path)
    runs = expand(spec, data_root="/some/coco")
    assert runs
    if spec.name == "gpu_e2e":  # a throughput check of the GPU path (scripts/gpu_e2e.sh), not a comparison
        assert len(spec.grid["seed"]) == 2 and all(r.config.data.source == "synthetic" for r in runs)
        return
    assert len(spec.grid.get("seed", [])) >= 3, "ablations that compare run at least 3 seeds"
    if spec.name != "quickstart":
        assert all(r.config.data.source == "coco" for r in runs)


# --- the one validation pass: what is declared is what runs ------------------------------------------------


def test_set_may_not_silently_replace_what_a_variant_sets(tmp_path):
    spec = load_ablation(write(tmp_path, BASIC))
    with pytest.raises(HarnessError, match=r"--set model.deform_layers='first:3' would replace what variant "
                                           r"'standard' sets \(model.deform_layers='none'\)"):
        expand(spec, parse_set(["model.deform_layers=first:3"]))
    with pytest.raises(HarnessError, match="variant 'standard' sets"):
        expand(spec, parse_set(["model={width: 0.5}"]))  # a parent of the variant's key
    with pytest.raises(HarnessError, match="have the same config"):  # forced: a model compared with itself
        expand(spec, parse_set(["model.deform_layers=first:3"]), override_variants=True)
    nine = BASIC.replace("standard: {model: {deform_layers: none}}",
                         "standard: {model: {deform_layers: none}, train: {epochs: 9}}")
    epochs = load_ablation(write(tmp_path, nine))
    with pytest.raises(HarnessError, match="variant 'standard' sets"):
        expand(epochs, parse_set(["train.epochs=1"]))
    runs = expand(epochs, parse_set(["train.epochs=1"]), override_variants=True)
    assert {r.config.train.epochs for r in runs} == {1}
    # --set of a key no variant sets, or to the value the variant already has, is fine
    assert expand(spec, parse_set(["model.width=0.5"]))[0].config.model.width == 0.5
    same = expand(load_ablation(write(tmp_path, BASIC.replace('"first:2"', "none").replace(
        "deform: {model: {deform_layers: none}}", "deform: {model: {deform_layers: none, width: 0.5}}"))),
        parse_set(["model.deform_layers=none"]))
    assert len({r.config_hash for r in same}) == len(same)


def test_two_runs_with_one_config_are_refused(tmp_path):
    text = BASIC.replace('deform: {model: {deform_layers: "first:2"}}', "again: {model: {deform_layers: none}}")
    with pytest.raises(HarnessError, match=r"runs 'standard/data.train_size=100/seed=0' and "
                                           r"'again/data.train_size=100/seed=0' have the same config"):
        expand(load_ablation(write(tmp_path, text)))


def test_large_grids_need_max_runs(tmp_path):
    text = BASIC.replace("seed: [0, 1]", "seed: " + str(list(range(5000))))
    spec = load_ablation(write(tmp_path, text))
    with pytest.raises(HarnessError, match=r"expands to 20,000 runs, more than 256: pass --max-runs 20000"):
        expand(spec)
    assert len(expand(spec, parse_set(["grid.seed=[0, 1, 2]"]), max_runs=12)) == 12
    with pytest.raises(HarnessError, match="more than 11"):
        expand(spec, parse_set(["grid.seed=[0, 1, 2]"]), max_runs=11)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.inf", r"train.lr: Input should be a finite number"),
        ("train.lr=.nan", r"train.lr: Input should be a finite number"),
        ("model.width=.inf", r"model.width: Input should be a finite number"),
        ("model.deform_layers=[99]", r"deform_layers indices \[99\] are outside 0..10 \(unet_encoder\)"),
        ("model.deform_layers=first:99", r"'first:99': the network has 11 conv layers"),
        ("model.deform_layers=bogus", r"'bogus' is not one of none, all"),
    ],
)
def test_values_that_would_fail_at_run_time_fail_here(tmp_path, override, message):
    spec = load_ablation(write(tmp_path, BASIC))
    with pytest.raises(HarnessError, match=message):
        expand(spec, parse_set([override]), override_variants=True)


def test_names_are_bounded(tmp_path):
    long = "v" * 1000
    with pytest.raises(HarnessError, match="longer than 64 characters"):
        load_ablation(write(tmp_path, BASIC.replace("  standard:", f"  {long}:")))
    with pytest.raises(HarnessError) as caught:
        load_ablation(write(tmp_path, BASIC.replace("name: demo", f"name: {long}")))
    assert "name" in str(caught.value) and len(str(caught.value)) < 400  # the value is shown shortened


def test_from_study_is_resolved_before_the_hash(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.01}, distributions={"lr": lr}, value=0.5))
    with_study = BASIC.replace("train: {epochs: 3}", "train: {epochs: 3, lr: {from_study: s}}")
    spec = load_ablation(write(tmp_path, with_study))
    first = expand(spec, storage=storage)
    assert {r.config.train.lr for r in first} == {0.01} and {r.lr_study for r in first} == {"s"}
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.003}, distributions={"lr": lr}, value=0.9))
    second = expand(spec, storage=storage)
    assert {r.config.train.lr for r in second} == {0.003}
    assert not {r.config_hash for r in first} & {r.config_hash for r in second}  # a rerun is not "same config"
    with pytest.raises(HarnessError, match="no Optuna study 'missing'"):
        expand(load_ablation(write(tmp_path, BASIC.replace("train: {epochs: 3}",
                                                           "train: {epochs: 3, lr: {from_study: missing}}"))),
               storage=storage)
