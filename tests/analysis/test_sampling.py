"""Layer geometry and the composition of sampling points through consecutive layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from harness.analysis.sampling import capture_offsets, compose_points, conv_geometry, default_chain
from harness.errors import HarnessError
from harness.models import small3, unet_encoder


def _sorted(points: np.ndarray) -> np.ndarray:
    return points[np.lexsort((points[:, 1], points[:, 0]))]


def test_unet_encoder_planes_sit_on_the_image_as_pooling_says():
    geometry = conv_geometry(unet_encoder(num_classes=3, width=0.1, deform_layers=[0, 5]))
    assert [g.index for g in geometry] == list(range(11))
    assert [g.deformable for g in geometry] == [i in (0, 5) for i in range(11)]
    factors = [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 16]
    assert [g.in_scale[0] for g in geometry] == factors
    # pixel u of a plane at factor f covers image pixels f·u .. f·u + f − 1: centre f·u + (f − 1)/2
    assert [g.in_shift[0] for g in geometry] == [(f - 1) / 2 for f in factors]


def test_two_layers_zero_offsets_give_81_points_by_hand():
    model = unet_encoder(num_classes=3, width=0.1, deform_layers=[0, 1])
    geometry = conv_geometry(model)
    captured = capture_offsets(model, torch.randn(1, 3, 32, 32))
    fields = {i: off[0, 0].double().numpy() for i, (off, _) in captured.items()}
    assert all(np.all(f == 0) for f in fields.values())
    levels = compose_points(geometry, [0, 1], (5, 7), fields)
    assert [len(level) for level in levels] == [1, 9, 81]
    assert np.array_equal(levels[0], [[5.0, 7.0]])
    taps = list(itertools.product((-1, 0, 1), repeat=2))
    assert np.array_equal(_sorted(levels[1]), _sorted(np.array([[5 + a, 7 + b] for a, b in taps], float)))
    expected = np.array([[5 + a + c, 7 + b + d] for a, b in taps for c, d in taps], float)
    assert np.array_equal(_sorted(levels[2]), _sorted(expected))
    assert np.array_equal(levels[2], compose_points(geometry, [0, 1], (5, 7))[2])  # no offsets = fixed grid


def test_composition_through_a_pooling_layer_by_hand():
    model = unet_encoder(num_classes=3, width=0.1, deform_layers=[1, 2])  # conv2 comes after the first 2x2 pool
    geometry = conv_geometry(model)
    levels = compose_points(geometry, [1, 2], (3, 4))
    taps = list(itertools.product((-1, 0, 1), repeat=2))
    # conv2's output (3, 4) is the pooled plane's pixel (3, 4): image centre 2·u + 0.5
    assert np.array_equal(levels[0], [[6.5, 8.5]])
    assert np.array_equal(_sorted(levels[1]), _sorted(np.array([[6.5 + 2 * a, 8.5 + 2 * b] for a, b in taps])))
    expected = np.array([[6.5 + 2 * a + c, 8.5 + 2 * b + d] for a, b in taps for c, d in taps])
    assert np.array_equal(_sorted(levels[2]), _sorted(expected))


def test_learned_offsets_move_the_points():
    model = small3(num_classes=3, deform_layers="first:2")
    layer0 = model.conv_layers()[0]
    with torch.no_grad():
        layer0.offset_predictor.bias.view(9, 2)[:] = torch.tensor([0.5, -0.25])  # every tap: Δy 0.5, Δx -0.25
    geometry = conv_geometry(model)
    captured = capture_offsets(model.eval(), torch.randn(1, 3, 16, 16))
    fields = {i: off[0, 0].double().numpy() for i, (off, _) in captured.items()}
    fixed = compose_points(geometry, [0, 1], (6, 6))
    learned = compose_points(geometry, [0, 1], (6, 6), fields)
    assert np.array_equal(learned[1], fixed[1])  # conv1's own offsets are zero
    assert np.allclose(learned[2] - fixed[2], [0.5, -0.25])


def test_default_chain_and_bad_chains():
    assert default_chain(conv_geometry(unet_encoder(3, 0.1, "first:2"))) == [0, 1]
    assert default_chain(conv_geometry(unet_encoder(3, 0.1, "all"))) == [9, 10]
    assert default_chain(conv_geometry(unet_encoder(3, 0.1, [0, 1, 7]))) == [0, 1]
    assert default_chain(conv_geometry(unet_encoder(3, 0.1, [4]))) == [4]
    assert default_chain(conv_geometry(unet_encoder(3, 0.1, "none"))) == []
    geometry = conv_geometry(small3(3))
    with pytest.raises(HarnessError, match="not consecutive"):
        compose_points(geometry, [0, 2], (1, 1))
    with pytest.raises(HarnessError, match="has 3 conv layers"):
        compose_points(geometry, [2, 3], (1, 1))
