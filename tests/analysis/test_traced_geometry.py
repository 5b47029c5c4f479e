"""Plane-to-image maps of networks without a `features` sequence, found by tracing one forward pass."""

from __future__ import annotations

import torch

from harness.analysis.sampling import (
    capture_offsets,
    conv_geometry,
    default_chain,
    sequential_geometry,
    traced_geometry,
)
from harness.config import ModelConfig
from harness.models import build_network, unet_encoder


def test_tracing_agrees_with_walking_the_sequence():
    model = unet_encoder(num_classes=3, width=0.1, deform_layers=[0, 5])
    walked, traced = sequential_geometry(model), traced_geometry(model, 32)
    assert [(g.index, g.deformable, g.in_scale, g.in_shift, g.out_scale, g.out_shift) for g in walked] == [
        (g.index, g.deformable, g.in_scale, g.in_shift, g.out_scale, g.out_shift) for g in traced]


def test_resnet_planes_follow_the_strides_through_residual_branches():
    model = build_network(ModelConfig(arch="resnet18", deform_layers="c5"), 4)
    geometry = conv_geometry(model, 64)
    by_name = {model.conv_names[g.index]: g for g in geometry}
    assert by_name["conv1"].out_scale == (2.0, 2.0)
    assert by_name["layer2.0.downsample.0"].in_scale == (4.0, 4.0)
    assert by_name["layer2.0.downsample.0"].out_scale == (8.0, 8.0)
    assert by_name["layer4.1.conv2"].in_scale == (32.0, 32.0) and by_name["layer4.1.conv2"].in_shift == (0.0, 0.0)
    assert [g.index for g in geometry if g.deformable] == model.deform_indices
    assert default_chain(geometry) == [18, 19]
    offsets = capture_offsets(model, torch.randn(1, 3, 64, 64))
    assert sorted(offsets) == model.deform_indices and offsets[19][0].shape == (1, 1, 9, 2, 2, 2)
