"""Offset statistics: effective dilation, |Δp|, tap spread, histograms and region labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.analysis.offsets import (
    HIST_EDGES,
    LARGE_FRACTION,
    SMALL_FRACTION,
    box_region,
    offset_statistics,
    region_map,
)
from harness.analysis.sampling import conv_geometry
from harness.models import small3, unet_encoder
from harness.ops import DeformConv2d


class Dilated(nn.Module):
    def __init__(self, dilation: int, offset_channels: str = "per_tap") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(DeformConv2d(3, 4, 3, padding=dilation, dilation=dilation, offset_channels=offset_channels)),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_zero_offsets_give_the_convs_dilation(dilation):
    model = Dilated(dilation)  # the offset predictor starts at exactly zero
    images = torch.randn(5, 3, 12, 12)
    boxes = [np.zeros((0, 4))] * 5
    stats = offset_statistics(model, images, boxes, image_size=12, batch_size=2)
    row = stats.table[stats.table["region"] == "all"].iloc[0]
    assert row["eff_dilation"] == dilation
    assert row["mean_abs"] == 0 and row["tap_spread"] == 0 and row["positions"] == 5 * 12 * 12
    assert stats.histograms[0][0] == 5 * 12 * 12 * 9 and stats.histograms[0][1:].sum() == 0
    metrics = stats.metrics()
    assert metrics["offset/conv0/eff_dilation"] == dilation
    assert metrics["offset/conv0/background/share"] == 1.0
    assert "offset/conv0/small/mean_abs" not in metrics  # no position there: no number


def test_shared_layout_random_offsets_keep_dilation_and_have_no_spread():
    model = Dilated(2, "shared")
    with torch.no_grad():
        model.features[0][0].offset_predictor.weight.normal_(0, 0.5)
    stats = offset_statistics(model, torch.randn(3, 3, 10, 10), [np.zeros((0, 4))] * 3, image_size=10)
    row = stats.table[stats.table["region"] == "all"].iloc[0]
    assert row["mean_abs"] > 0.1
    assert row["eff_dilation"] == 2.0 and row["tap_spread"] == 0.0


def test_histogram_counts_every_tap_and_overflow():
    model = small3(num_classes=2, deform_layers="first:1")
    with torch.no_grad():
        model.conv_layers()[0].offset_predictor.bias.fill_(10.0)  # |Δp| = 10·√2: the overflow bin
    stats = offset_statistics(model, torch.randn(2, 3, 8, 8), [np.zeros((0, 4))] * 2, image_size=8)
    counts = stats.histograms[0]
    assert counts.sum() == 2 * 8 * 8 * 9 and counts[-1] == counts.sum()
    frame = stats.histogram_frame()
    assert len(frame) == len(HIST_EDGES) and frame["bin_hi"].iloc[-1] == float("inf")
    assert stats.table.iloc[0]["mean_abs"] == pytest.approx(10 * 2**0.5)


def test_box_regions_use_relative_coco_thresholds():
    assert box_region(SMALL_FRACTION * 0.99) == 1
    assert box_region(SMALL_FRACTION) == 2
    assert box_region(LARGE_FRACTION * 0.99) == 2
    assert box_region(LARGE_FRACTION) == 3


def test_region_map_by_hand():
    geometry = conv_geometry(unet_encoder(num_classes=2, width=0.1))
    size = 64
    big = [0, 0, 32, 64]  # half the image: large
    small = [40, 40, 43, 43]  # 9 px² of 4096: 0.0022 < 0.0033: small
    labels = region_map(np.array([big, small]), geometry[0], (64, 64), size)
    assert (labels[:, :32] == 3).all()
    assert labels[41, 41] == 1 and labels[40:43, 40:43].tolist() == [[1] * 3] * 3
    assert (labels[:, 32:] != 3).all() and labels[50, 50] == 0
    # a factor-2 plane: pixel u has its centre at image 2u + 1 (continuous coordinates)
    pooled = region_map(np.array([big, small]), geometry[2], (32, 32), size)
    assert (pooled[:, :16] == 3).all() and pooled[20, 20] == 1 and pooled[21, 21] == 0
    nested = region_map(np.array([big, [8, 8, 12, 12]]), geometry[0], (64, 64), size)
    assert nested[9, 9] == 2  # the smallest box containing the position wins (16/4096 = 0.0039: medium)


def test_modulated_layers_report_their_mask():
    model = small3(num_classes=2, deform_layers="first:1")
    model.features[0][0] = DeformConv2d(3, model.features[0][0].out_channels, 3, padding=1, modulated=True)
    stats = offset_statistics(model, torch.randn(2, 3, 8, 8), [np.zeros((0, 4))] * 2, image_size=8)
    assert stats.metrics()["offset/conv0/mask_mean"] == pytest.approx(0.5)  # zero-initialised predictor
