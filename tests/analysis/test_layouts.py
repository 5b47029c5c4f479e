"""What each offset layout can express, proven numerically.

Shared layout (2 channels: one Δp per output pixel for all k×k taps): the deformable layer is exactly an
ordinary convolution followed by a per-pixel bilinear warp of its output. Each tap samples
x(s·q − P + d·k + Δ(q)); bilinear interpolation uses the same four weights for every integer shift d·k, so
the weighted sum over taps equals the ordinary (stride-1) convolution z of the zero-padded input, sampled
bilinearly at s·q + Δ(q). A warp moves the receptive field; it cannot rescale, stretch or rotate it.
Per-tap layout (2·k·k channels): offsets can reproduce a dilated or a rotated kernel exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness.analysis.offsets import adjacent_distances
from harness.ops import DeformConv2d, deform_conv2d, expand_shared_offset


def bilinear_zero(z: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
    """Sample z [N, C, H, W] at real positions ty, tx [N, Ho, Wo] (zero outside), written out by hand."""
    n, c, h, w = z.shape
    y0, x0 = torch.floor(ty), torch.floor(tx)
    out = torch.zeros(n, c, *ty.shape[1:], dtype=z.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            weight = (1 - (ty - yy).abs()) * (1 - (tx - xx).abs())
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            yi, xi = yy.clamp(0, h - 1).long(), xx.clamp(0, w - 1).long()
            for b in range(n):
                values = z[b][:, yi[b], xi[b]]  # [C, Ho, Wo]
                out[b] += values * (weight[b] * inside[b])
    return out


def conv_then_warp(x, weight, offset, stride, padding, dilation):
    """Ordinary conv over the (infinitely) zero-padded input, then a bilinear warp by the shared offsets."""
    k = weight.shape[-1]
    margin = int(math.ceil(offset.abs().max().item())) + dilation * (k - 1) + 2
    z = F.conv2d(x, weight, padding=padding + margin, dilation=dilation)  # index i is anchor u = i - margin
    ho, wo = offset.shape[-2:]
    qy = torch.arange(ho, dtype=x.dtype).view(1, ho, 1) * stride
    qx = torch.arange(wo, dtype=x.dtype).view(1, 1, wo) * stride
    return bilinear_zero(z, qy + offset[:, 0] + margin, qx + offset[:, 1] + margin)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_shared_offset_layer_is_conv_followed_by_warp(stride, padding, dilation):
    g = torch.Generator().manual_seed(stride * 10 + dilation)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64, generator=g)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    ho = (11 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (9 + 2 * padding - dilation * 2 - 1) // stride + 1
    offset = 3.0 * torch.randn(2, 2, ho, wo, dtype=torch.float64, generator=g)  # one (Δy, Δx) per pixel
    expected = conv_then_warp(x, weight, offset, stride, padding, dilation)
    per_tap = expand_shared_offset(offset, 9)
    ours = deform_conv2d(x, per_tap, weight, None, stride, padding, dilation)
    theirs = tv_deform_conv2d(x, per_tap, weight, None, stride, padding, dilation)
    assert (ours - expected).abs().max().item() < 1e-6
    assert (theirs - expected).abs().max().item() < 1e-6
    layer = DeformConv2d(3, 4, 3, stride, padding, dilation, bias=False, offset_channels="shared").double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.predict = lambda _x: (offset, None)  # type: ignore[method-assign]  # the module's fast path, our offsets
    assert (layer(x) - expected).abs().max().item() < 1e-6


def test_shared_offsets_keep_the_kernel_shape_exactly():
    g = torch.Generator().manual_seed(0)
    shared = 5.0 * torch.randn(3, 2, 6, 7, dtype=torch.float64, generator=g)
    per_tap = expand_shared_offset(shared, 9).view(3, 1, 9, 2, 6, 7)
    for dilation in (1, 2, 3):
        dist = adjacent_distances(per_tap, (3, 3), (dilation, dilation))
        assert torch.equal(dist, torch.full_like(dist, float(dilation)))


def _taps():
    return [(i - 1, j - 1) for i in range(3) for j in range(3)]


def test_per_tap_offsets_can_dilate_the_kernel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 10, 10, dtype=torch.float64, generator=g)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g)
    offset = torch.zeros(1, 18, 10, 10, dtype=torch.float64)
    for k, (dy, dx) in enumerate(_taps()):  # tap at p_k moves to 2·p_k
        offset[:, 2 * k], offset[:, 2 * k + 1] = dy, dx
    got = deform_conv2d(x, offset, weight, None, 1, 1, 1)
    want = F.conv2d(x, weight, padding=2, dilation=2)
    assert (got - want).abs().max().item() < 1e-10
    dist = adjacent_distances(offset.view(1, 1, 9, 2, 10, 10), (3, 3), (1, 1))
    assert torch.allclose(dist, torch.full_like(dist, 2.0))


def test_per_tap_offsets_can_rotate_the_kernel():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, generator=g)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g)
    offset = torch.zeros(1, 18, 8, 8, dtype=torch.float64)
    rotated = torch.zeros_like(weight)
    for k, (dy, dx) in enumerate(_taps()):  # 90°: (dy, dx) -> (dx, -dy)
        ry, rx = dx, -dy
        offset[:, 2 * k], offset[:, 2 * k + 1] = ry - dy, rx - dx
        rotated[:, :, ry + 1, rx + 1] = weight[:, :, dy + 1, dx + 1]
    got = deform_conv2d(x, offset, weight, None, 1, 1, 1)
    want = F.conv2d(x, rotated, padding=1)
    assert (got - want).abs().max().item() < 1e-10
