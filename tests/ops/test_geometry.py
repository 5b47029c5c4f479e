"""Argument checks: bad shapes raise a ValueError naming them, every time, also past the geometry cache."""

from __future__ import annotations

import pytest
import torch

from harness.ops import DeformConv2d, deform_conv2d

from .conftest import dcn_case


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: {**t, "input": t["input"][0]}, r"input must be 4-D"),
        (
            lambda t: {**t, "offset": t["offset"][:, :17]},
            r"offset must have a positive multiple of 18 channels.*given 17",
        ),
        (
            lambda t: {**t, "offset": t["offset"][:, :, :3]},
            r"offset must have shape \(2, 18, 7, 9\), given \(2, 18, 3, 9\)",
        ),
        (lambda t: {**t, "mask": t["mask"][:, :5]}, r"mask must have a positive multiple of 9 channels.*given 5"),
        (lambda t: {**t, "mask": t["mask"][:1]}, r"mask must have shape \(2, 9, 7, 9\), given \(1, 9, 7, 9\)"),
        (lambda t: {**t, "weight": t["weight"][:, :3]}, r"weight expects C/groups = 3.*4 channels"),
        (lambda t: {**t, "weight": t["weight"][0]}, r"weight must be 4-D"),
        (lambda t: {**t, "bias": t["bias"][:2]}, r"bias must have shape \(6,\), given \(2,\)"),
        (lambda t: {**t, "weight": t["weight"][:5, :2]}, r"groups=2 .* must divide the 5 output channels"),
    ],
)
def test_bad_shapes_raise_value_error_naming_shapes(mutate, match):
    x, offset, weight, bias, mask, _ = dcn_case(torch.float32)
    t = mutate({"input": x, "offset": offset, "weight": weight, "bias": bias, "mask": mask})
    with pytest.raises(ValueError, match=match):
        deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])


def test_geometry_cache_keeps_errors_and_takes_lists():
    # the validated geometry is cached by shapes: a bad call must raise every time, and a list
    # (unhashable) stride or padding must still be accepted
    x, offset, weight, bias, mask, _ = dcn_case(torch.float32)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"bias must have shape \(6,\), given \(2,\)"):
            deform_conv2d(x, offset, weight, bias[:2], 1, 1, 1, mask)
        with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
            deform_conv2d(x, offset, weight, bias, [0, 1], 1, 1, mask)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, [1, 1], [1, 1], [1, 1], mask),
                               deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask), atol=0, rtol=0)


def test_offset_groups_must_divide_channels():
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="2 offset groups, which do not divide the 3 input channels"):
        deform_conv2d(x, torch.zeros(1, 36, 5, 5), torch.randn(2, 3, 3, 3), padding=1)
    with pytest.raises(ValueError, match="offset_groups=2 must divide in_channels=3"):
        DeformConv2d(3, 4, offset_groups=2)
