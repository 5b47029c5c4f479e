"""Robustness transforms: the identity reproduces `evaluate` exactly; the maps do what they say."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from harness.analysis.pipeline import build_model, val_loader
from harness.analysis.robustness import (
    FAMILIES,
    check_families,
    content_matrix,
    robustness,
    robustness_metrics,
    warp,
)
from harness.config import RunConfig
from harness.data import prepare_data
from harness.errors import HarnessError
from harness.train import evaluate

MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-. /]+$")


@pytest.fixture(scope="module")
def model_and_loader(synth_root, tmp_path_factory):
    data = prepare_data(synth_root, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))
    config = RunConfig.model_validate({"model": {"arch": "small3", "deform_layers": "first:1"},
                                       "train": {"batch_size": 16}})
    torch.manual_seed(0)
    model = build_model(config, data.num_classes).eval()
    with torch.no_grad():
        model.conv_layers()[0].offset_predictor.weight.normal_(0, 0.1)
    return model, val_loader(config, data, torch.device("cpu"))


def test_identity_transform_reproduces_evaluate_exactly(model_and_loader):
    model, loader = model_and_loader
    plain = evaluate(model, loader)
    families = {"rotation": [0, 30], "scale": [1.0], "stretch": [1.0], "shear": [0]}
    frame = robustness(model, loader, families)
    identity = frame[frame["identity"]]
    assert sorted(identity["family"]) == sorted(families)
    for row in identity.itertuples():
        assert row.map == plain["val/map"] and row.micro_f1 == plain["val/micro_f1"]
        assert row.macro_f1 == plain["val/macro_f1"] and row.loss == plain["val/loss"]
        assert row.rel_map == 1.0
    rotated = frame[(frame["family"] == "rotation") & (frame["magnitude"] == 30)].iloc[0]
    assert rotated["map"] != plain["val/map"]
    metrics = robustness_metrics(frame)
    assert metrics["robust/rotation/0/map"] == plain["val/map"]
    assert metrics["robust/rotation/mean_map_drop"] == pytest.approx(1 - rotated["map"] / plain["val/map"])
    assert all(MLFLOW_KEY.match(k) for k in metrics)


def test_transforms_move_pixels_as_documented():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert warp(x, "rotation", 0) is x and warp(x, "scale", 1) is x
    # 90° counter-clockwise on screen: the top row becomes the left column, read bottom-up
    assert torch.allclose(warp(x, "rotation", 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-10)
    marker = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    marker[0, 0, 3:5, 6] = 1.0  # right of centre
    up = warp(marker, "rotation", 90)
    assert up[0, 0, 1, 3:5].sum() > 1.9  # now above the centre
    half = warp(torch.ones(1, 1, 8, 8, dtype=torch.float64), "scale", 0.5)
    assert half[0, 0, 2:6, 2:6].min() == 1.0 and half[0, 0, 0].max() == 0.0  # zoomed out, zero padding
    for family, magnitudes in FAMILIES.items():
        for m in magnitudes:
            a = content_matrix(family, m)
            if family != "scale":
                assert np.linalg.det(a) == pytest.approx(1.0)  # rotation, stretch and shear keep area


def test_families_are_checked():
    assert check_families({"rotation": [30]}) == {"rotation": (0.0, 30.0)}
    with pytest.raises(HarnessError, match="unknown transform family 'blur'"):
        check_families({"blur": [1]})
    with pytest.raises(HarnessError, match="must be positive"):
        check_families({"scale": [0]})
