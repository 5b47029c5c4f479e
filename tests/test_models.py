"""The assignment's networks and deformable placement."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.models import (
    DeformOptions,
    create_model,
    measure_cost,
    offset_parameters,
    resolve_deform_layers,
)
from harness.ops import DeformConv2d


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("none", []),
        ("all", list(range(11))),
        ("first:2", [0, 1]),
        ("last:2", [9, 10]),
        ("middle:3", [4, 5, 6]),
        ([7, 0, 7], [0, 7]),
    ],
)
def test_resolve_deform_layers(spec, expected):
    assert resolve_deform_layers(spec, 11) == expected


@pytest.mark.parametrize("spec", ["first:12", "sideways:2", "first:x", [11], [-1]])
def test_resolve_deform_layers_rejects_bad_specs(spec):
    with pytest.raises(HarnessError, match="deform_layers"):
        resolve_deform_layers(spec, 11)


def test_unet_encoder_has_eleven_3x3_convs_and_80_logits():
    model = create_model("unet_encoder", width=0.25, deform_layers="first:2")
    convs = model.conv_layers()
    assert len(convs) == 11
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [type(c) is DeformConv2d for c in convs] == [True, True] + [False] * 9
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 256]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.head)
    assert n_linear == 3
    for size in (32, 48, 64):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 80)
    with pytest.raises(ValueError, match="16 px minimum"):
        model(torch.randn(1, 3, 8, 8))


def test_width_one_is_unet_widths():
    model = create_model("unet_encoder", width=1.0)
    assert [c.out_channels for c in model.conv_layers()][::2] == [64, 128, 256, 512, 1024, 1024][:6]


def test_small3_and_options_pass_through():
    opts = DeformOptions(offset_channels="shared", modulated=True, offset_groups=1)
    model = create_model("small3", num_classes=7, deform_layers="all", options=opts)
    convs = model.conv_layers()
    assert len(convs) == 3 and all(isinstance(c, DeformConv2d) for c in convs)
    assert all(c.offset_channels == "shared" and c.modulated for c in convs)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_offset_parameters_are_separable():
    model = create_model("unet_encoder", deform_layers="last:2")
    offset_ids = {id(p) for p in offset_parameters(model)}
    assert len(offset_ids) == 4  # weight + bias of two predictors
    rest = [p for p in model.parameters() if id(p) not in offset_ids]
    assert len(rest) + len(offset_ids) == len(list(model.parameters()))


def test_cost_grows_with_deformable_layers():
    standard = measure_cost(create_model("unet_encoder", deform_layers="none"), 64)
    deform = measure_cost(create_model("unet_encoder", deform_layers="all"), 64)
    assert standard.params > 100_000
    assert deform.params > standard.params
    # a 3x3 conv from 3 to 16 channels at 64x64 alone is 2*3*9*16*64*64 flops
    assert standard.flops_per_image > 2 * 3 * 9 * 16 * 64 * 64
    assert deform.flops_per_image > standard.flops_per_image


def test_unknown_arch():
    with pytest.raises(HarnessError, match="unknown model arch 'resnet'"):
        create_model("resnet")
