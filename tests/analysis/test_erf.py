"""Gradient-based effective receptive field on networks whose answer is known by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.analysis.erf import effective_receptive_field
from harness.ops import DeformConv2d


class OneConv(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(conv, nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_single_3x3_conv_of_ones_has_a_uniform_3x3_erf():
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    erf = effective_receptive_field(OneConv(conv), torch.randn(4, 3, 9, 9))
    expected = np.zeros((9, 9))
    expected[3:6, 3:6] = 1 / 9
    assert np.allclose(erf.map, expected)
    assert erf.centre == (4.0, 4.0)
    assert erf.rms_radius == pytest.approx(np.sqrt(12 / 9))
    assert erf.mass_fraction_area(0.9) == pytest.approx(9 / 81)
    assert erf.metrics()["erf/layer"] == 0


def test_even_plane_uses_the_central_2x2_units():
    conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    erf = effective_receptive_field(OneConv(conv), torch.randn(1, 3, 8, 8))
    assert erf.centre == (3.5, 3.5)
    assert np.allclose(erf.map, erf.map[::-1, ::-1])  # symmetric about the image centre
    assert (erf.map[2:6, 2:6] > 0).all() and erf.map[:2].sum() == 0


def test_zero_offset_deformable_layer_has_the_conv_erf():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    deform = DeformConv2d.from_conv(conv)
    x = torch.randn(3, 3, 11, 11)
    a = effective_receptive_field(OneConv(conv), x).map
    b = effective_receptive_field(OneConv(deform), x).map
    assert np.allclose(a, b, atol=1e-7)
