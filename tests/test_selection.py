"""Selection vs reporting in `fit`: val picks the epoch, whose kept weights are evaluated on the held-out sets
(test, ood) with the chance baseline, per-size mAP and per-class AP; and the run logs them to MLflow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import RunConfig
from harness.data import BatchLoader, DataCache, prepare_data
from harness.metrics import HIGHER_IS_BETTER, multilabel_metrics
from harness.tracking import names
from harness.train import Selection, build_trainer, evaluate, evaluate_selected, fit, size_buckets

CPU = torch.device("cpu")
METRICS = list(multilabel_metrics(torch.ones(1, 2), torch.ones(1, 2)))


def config(data: dict, epochs: int = 1) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"image_size": 32, **data},
        "model": {"arch": "small3", "deform_layers": "first:1", "offset_channels": "per_tap"},
        "train": {"epochs": epochs, "batch_size": 16},
        "profile": {"enabled": False},
    })


SYNTH = {
    "source": "synthetic", "test_size": 16,
    "synthetic": {"n_train": 32, "n_val": 48, "n_ood": 16, "train_geometry": {"rotation": [-20, 20]},
                  "ood_geometry": {"rotation": [-180, 180], "stretch": [1.5, 2.5]}},
}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    return DataCache(tmp_path_factory.mktemp("results")).get(config(SYNTH).data, lambda *_: None)


def test_size_buckets_follow_cocos_area_rule() -> None:
    areas = np.array([10.0, 1023.9, 1024.0, 9215.0, 9216.0, 1e6, np.nan])
    assert size_buckets(areas).tolist() == [0, 0, 1, 1, 2, 2, -1]


def test_fit_reports_test_ood_and_chance_at_the_selected_epoch(synth_data) -> None:
    result = fit(config(SYNTH, epochs=2), synth_data, lr=3e-3, device=CPU)
    summary = result.summary
    assert summary[names.SELECTED_EPOCH] == summary[names.BEST_EPOCH]
    for metric in METRICS:
        for name in (names.test_of(metric), names.ood_of(metric), names.chance_of(metric)):
            assert 0.0 <= summary[name] <= 1.0, name
    assert set(HIGHER_IS_BETTER) >= set(METRICS) and names.test_of("loss") in summary
    assert not any(key.startswith(names.by_size(names.test_of("map"), "")) for key in summary)  # synthetic: no sizes
    doc = result.per_class_ap
    assert doc is not None and doc["split"] == "test" and doc["epoch"] == summary[names.SELECTED_EPOCH]
    assert doc["classes"] == synth_data.class_names and len(doc["ap"]) == len(doc["support"]) == 8
    assert doc["support"] == synth_data.test_targets.sum(0).int().tolist()
    defined = [ap for ap in doc["ap"] if ap is not None]
    assert np.mean(defined) == pytest.approx(summary[names.test_of("map")])
    json.dumps(doc)  # plain JSON


def test_held_out_sets_use_the_selected_weights_not_the_last(synth_data) -> None:
    cfg = config(SYNTH)
    trainer = build_trainer(cfg, synth_data.num_classes, 1e-3, CPU)
    val_loader = BatchLoader(synth_data.val_images, synth_data.val_targets, batch_size=64, shuffle=False, hflip=False)
    without_test = dataclasses.replace(synth_data, test_images=None, test_targets=None)
    selection = Selection()
    selection.offer(1, 0.9, trainer.model)
    expected = evaluate(trainer.model, val_loader)[names.VAL_MAP]
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p))
    selection.offer(2, 0.5, trainer.model)  # worse: not kept
    assert selection.epoch == 1
    summary, doc = evaluate_selected(cfg, without_test, trainer, selection)
    assert doc is not None and doc["split"] == "val" and doc["epoch"] == 1
    assert np.mean([ap for ap in doc["ap"] if ap is not None]) == pytest.approx(expected)
    assert names.chance_of("map") in summary and names.test_of("map") not in summary


def test_coco_headline_set_is_split_by_object_size(coco_mini_root: Path, tmp_path: Path) -> None:
    sizes = {"train_size": 48, "val_size": 32, "test_size": 120}
    data = prepare_data(coco_mini_root, image_size=32, cache_dir=None, workers=2, **sizes)
    result = fit(config({"root": str(coco_mini_root), **sizes}), data, lr=3e-3, device=CPU)
    buckets = size_buckets(data.largest_areas("test"))
    for index, size in enumerate(names.OBJECT_SIZES):
        key = names.by_size(names.test_of("map"), size)
        assert (key in result.summary) == bool((buckets == index).any()), key
    assert result.per_class_ap is not None and len(result.per_class_ap["classes"]) == 80


def test_harness_run_logs_held_out_metrics_and_per_class_ap(tmp_path: Path) -> None:
    file = tmp_path / "heldout.yaml"
    file.write_text(json.dumps({
        "name": "heldout", "base": {**config(SYNTH).model_dump(mode="json", exclude={"seed"}),
                                   "train": {"epochs": 1, "batch_size": 16, "threads": 1}},
        "variants": {"standard": {}},
    }))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    threads = torch.get_num_threads()
    try:
        assert main(["run", str(file), "--tracking-uri", uri, "--results-dir", str(tmp_path / "r"), "--no-profile",
                     "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("heldout")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'child'")
    metrics = run.data.metrics
    assert metrics[names.TEST_IMAGES] == 16 and metrics[names.OOD_IMAGES] == 16 and metrics[names.SELECTED_EPOCH] == 1
    assert {names.test_of("map"), names.ood_of("map"), names.chance_of("map")} <= metrics.keys()
    path = client.download_artifacts(run.info.run_id, names.PER_CLASS_AP_ARTIFACT, str(tmp_path))
    doc = json.loads(Path(path).read_text())
    assert doc["split"] == "test" and doc["epoch"] == 1 and len(doc["classes"]) == 8
