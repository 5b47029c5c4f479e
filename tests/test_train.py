"""`harness.train.fit` directly: mixed precision, channels_last, resume, NaN detection."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config import RunConfig
from harness.data import prepare_data
from harness.tracking import names
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


def test_a_seeded_run_repeats_bit_for_bit(data):
    """The same config, seed and thread count give the same numbers, every one of them: deformable layers
    included, whose weight gradients are summed over per-thread copies in a fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [fit(config(epochs=2), data, lr=3e-3, device=torch.device("cpu")) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    timings = {names.EPOCH_TIME, names.TRAIN_IMAGES_PER_S, names.DATA_WAIT}
    first, second = ([{k: v for k, v in record.items() if k not in timings} for record in run.history] for run in runs)
    assert first == second
