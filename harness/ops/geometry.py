"""Argument and shape validation of `deform_conv2d`: the layer's geometry (cached by shapes), output sizes,
the offset's and mask's channel layout, and the offsets' coordinate dtype."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

IntPair = int | tuple[int, int]

# ((stride, padding, dilation) pairs, conv groups, output channels, kernel (kh, kw), output size (Ho, Wo))
Geometry = tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int]], int, int, tuple[int, int], tuple[int, int]]


def pair(value: IntPair, name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair; a ValueError naming `name` otherwise."""
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, given {value!r}")
    return values  # type: ignore[return-value]


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """A convolution's output length along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_common(
    input_shape: torch.Size,
    weight_shape: torch.Size,
    bias_shape: torch.Size | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Validate the input, weight and bias shapes; return (groups, out_channels, kh, kw)."""
    if len(input_shape) != 4:
        raise ValueError(f"input must be 4-D [N, C, H, W], given shape {tuple(input_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(f"weight must be 4-D [O, C/groups, kh, kw], given shape {tuple(weight_shape)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"stride and dilation must be >= 1 and padding >= 0, given stride={stride}, "
            f"padding={padding}, dilation={dilation}"
        )
    n_in = input_shape[1]
    out_channels, channels_per_group = weight_shape[:2]
    if channels_per_group == 0 or n_in % channels_per_group != 0:
        raise ValueError(
            f"weight expects C/groups = {channels_per_group} input channels per group, which does not "
            f"divide the input's {n_in} channels (weight shape {tuple(weight_shape)}, "
            f"input shape {tuple(input_shape)})"
        )
    groups = n_in // channels_per_group
    if out_channels % groups != 0:
        raise ValueError(
            f"groups={groups} (from input {n_in} / weight {channels_per_group} channels) must divide the "
            f"{out_channels} output channels of weight {tuple(weight_shape)}"
        )
    if bias_shape is not None and tuple(bias_shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), given {tuple(bias_shape)}")
    return groups, out_channels, weight_shape[2], weight_shape[3]


def layer_geometry(
    input: Tensor, weight: Tensor, bias: Tensor | None, stride: IntPair, padding: IntPair, dilation: IntPair
) -> Geometry:
    """Validated (stride, padding, dilation) pairs, conv groups, output channels, kernel and output size.

    Cached by shapes: on a GPU a small layer is bound by the host, and validating from scratch was a
    quarter of the Python wrapper's time. Errors are not cached, so a bad call raises every time.
    """
    key = (input.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation)
    try:
        return _shape_geometry(*key)
    except TypeError:  # an unhashable argument (a list): validate without the cache
        return _shape_geometry.__wrapped__(*key)


@lru_cache(maxsize=512)
def _shape_geometry(
    input_shape: torch.Size, weight_shape: torch.Size, bias_shape: torch.Size | None, stride: IntPair,
    padding: IntPair, dilation: IntPair,
) -> Geometry:
    pairs = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    groups, out_channels, kh, kw = _check_common(input_shape, weight_shape, bias_shape, *pairs)
    (sh, sw), (ph, pw), (dh, dw) = pairs
    h, w = input_shape[-2:]
    out_hw = (output_size(h, kh, sh, ph, dh), output_size(w, kw, sw, pw, dw))
    if min(out_hw) < 1:
        raise ValueError(
            f"input {h}x{w} is too small for kernel {kh}x{kw} with padding {pairs[1]} and dilation "
            f"{pairs[2]}: output would be {out_hw[0]}x{out_hw[1]}"
        )
    return pairs, groups, out_channels, (kh, kw), out_hw


def check_offset(
    name: str, tensor: Tensor, batch: int, per_group: int, n_in: int, out_hw: tuple[int, int]
) -> int:
    """Validate an offset or mask tensor and return its number of offset groups."""
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, channels, Ho, Wo], given shape {tuple(tensor.shape)}")
    channels = tensor.shape[1]
    if channels == 0 or channels % per_group != 0:
        raise ValueError(
            f"{name} must have a positive multiple of {per_group} channels (one set per offset group), "
            f"given {channels} (shape {tuple(tensor.shape)})"
        )
    groups = channels // per_group
    if n_in % groups != 0:
        raise ValueError(
            f"{name} has {channels} channels = {groups} offset groups, which do not divide the "
            f"{n_in} input channels"
        )
    expected = (batch, channels, *out_hw)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, given {tuple(tensor.shape)}")
    return groups


def as_coordinates(offset: Tensor, input: Tensor) -> Tensor:
    """The offset in the sampling positions' dtype, at least fp32: in bf16/fp16 (autocast) a position of 60
    is off by 0.25 px. No cast (a dispatch on a host-bound GPU layer) when it already is."""
    dtype = torch.float64 if torch.float64 in (offset.dtype, input.dtype) else torch.float32
    return offset if offset.dtype == dtype else offset.to(dtype)


def expand_shared_offset(offset: Tensor, taps: int) -> Tensor:
    """[N, 2·G, Ho, Wo] shared offsets → torchvision's per-tap layout [N, 2·G·taps, Ho, Wo]."""
    n, channels, ho, wo = offset.shape
    groups = channels // 2
    return (
        offset.reshape(n, groups, 1, 2, ho, wo)
        .expand(n, groups, taps, 2, ho, wo)
        .reshape(n, groups * taps * 2, ho, wo)
    )
