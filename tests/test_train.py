"""`harness.train.fit` directly: mixed precision, channels_last, resume, NaN detection."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config import RunConfig
from harness.data import prepare_data
from harness.train import DivergedError, fit


@pytest.fixture(scope="module")
def data(synth_root, tmp_path_factory):
    return prepare_data(synth_root, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))


def config(**train) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"image_size": 32},
        "model": {"arch": "small3", "deform_layers": "all", "offset_channels": "per_tap", "modulated": True},
        "train": {"epochs": 1, "batch_size": 16, **train},
        "profile": {"enabled": False},
    })


def test_bf16_autocast_and_channels_last_train(data):
    result = fit(config(amp="bf16", channels_last=True), data, lr=3e-3, device=torch.device("cpu"))
    (record,) = result.history
    assert math.isfinite(record["train/loss"]) and 0 <= record["val/map"] <= 1


def test_resume_continues_from_the_checkpoint(data, tmp_path):
    checkpoint = tmp_path / "last.pt"
    first = fit(config(epochs=1), data, lr=3e-3, device=torch.device("cpu"), checkpoint_path=checkpoint)
    both = fit(config(epochs=2), data, lr=3e-3, device=torch.device("cpu"), checkpoint_path=checkpoint)
    assert both.resumed_from == 1
    assert [h["epoch"] for h in both.history] == [1.0, 2.0]
    assert both.history[0] == first.history[0]


def test_nan_loss_raises_with_epoch_and_step(data):
    with pytest.raises(DivergedError, match=r"diverged at epoch 1: train loss is (nan|inf) at step \d"):
        fit(config(), data, lr=1e12, device=torch.device("cpu"))
