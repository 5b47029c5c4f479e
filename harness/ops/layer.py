"""`DeformConv2d`, the layer the networks use: conv weights plus a zero-initialised offset (and mask) predictor,
so at initialisation an unmodulated layer is exactly an ordinary convolution."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from harness.kernels import native
from harness.ops import cpu, dispatch
from harness.ops.geometry import IntPair, expand_shared_offset, pair

OffsetLayout = Literal["shared", "per_tap"]
Backend = Literal["native", "torchvision"]


class DeformConv2d(nn.Module):
    """A convolution whose sampling grid is deformed by offsets predicted from its own input.

    The offset (and, for DCNv2, mask) predictor is a convolution with the same kernel, stride,
    padding and dilation, zero-initialised: at initialisation the offsets are 0 (and the mask 0.5),
    so an unmodulated layer is exactly ``nn.Conv2d`` with the same weights. Its parameters are
    returned by `offset_parameters()` so that an optimizer can give them their own learning rate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair = 3,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        offset_channels: OffsetLayout = "per_tap",
        modulated: bool = False,
        offset_groups: int = 1,
        backend: Backend = "native",
    ) -> None:
        super().__init__()
        if offset_channels not in ("shared", "per_tap"):
            raise ValueError(f"offset_channels must be 'shared' or 'per_tap', given {offset_channels!r}")
        if backend not in ("native", "torchvision"):
            raise ValueError(f"backend must be 'native' or 'torchvision', given {backend!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"offset_groups={offset_groups} must divide in_channels={in_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups, self.offset_groups = groups, offset_groups
        self.offset_channels: OffsetLayout = offset_channels
        self.modulated, self.backend = modulated, backend

        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = kh * kw
        self.n_offset = 2 * offset_groups * (taps if offset_channels == "per_tap" else 1)
        self.n_mask = offset_groups * taps if modulated else 0
        self.offset_predictor = nn.Conv2d(
            in_channels, self.n_offset + self.n_mask, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=True,
        )
        self._lay_out_weight()
        self.reset_parameters()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """After a move or cast (`.to`, `.cuda`, …) the weight is laid out for its device again, as torch's RNNs
        flatten theirs for cuDNN here."""
        moved = super()._apply(fn, recurse)
        self._lay_out_weight()
        return moved

    def _lay_out_weight(self) -> None:
        """The weight in the memory its device's kernels read without a copy: [O, kh, kw, C] (channels-last) on
        the CPU, where the compiled kernel's column rows are tap-major, so that neither its forward nor its
        backward re-lays it out and its gradient comes back in the parameter's own layout (autograd then
        takes it as is, no copy); [O, C, kh, kw] (contiguous) elsewhere, for the GPU's batched matmuls."""
        on_cpu = self.weight.device.type == "cpu" and self.groups == 1
        layout = torch.channels_last if on_cpu else torch.contiguous_format
        if not self.weight.is_contiguous(memory_format=layout):
            self.weight.data = self.weight.data.contiguous(memory_format=layout)

    def reset_parameters(self) -> None:
        """Conv weights as `nn.Conv2d` initialises them; the offset/mask predictor at exactly zero."""
        reference = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, groups=self.groups, bias=self.bias is not None
        )
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            if self.bias is not None:
                self.bias.copy_(reference.bias)
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: object) -> DeformConv2d:
        """A deformable layer with `conv`'s geometry and a copy of its weights."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
            conv.dilation, conv.groups, conv.bias is not None, **options,  # type: ignore[arg-type]
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the offset/mask predictor (DCNv2 trains them at 0.1x the learning rate)."""
        return self.offset_predictor.parameters()

    def predict(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The offsets (in this layer's layout) and the mask (after the sigmoid) for `input`."""
        raw = self.offset_predictor(input)
        if not self.modulated:
            return raw, None
        # split, not two slices: its backward writes both gradients into one tensor in one pass (each
        # slice's backward would zero a tensor of raw's size and copy into it)
        offset, mask = raw.split([self.n_offset, self.n_mask], dim=1)
        return offset, torch.sigmoid(mask)

    def forward(self, input: Tensor) -> Tensor:
        if self.backend == "native" and self.groups == 1 and input.device.type == "cpu" and native.available():
            # One layout change for both users of the input: the compiled kernel needs it channels-last,
            # and oneDNN runs the offset predictor 1.3-1.4x faster on it (and then writes offsets in the
            # pixel-major order the kernel reads best).
            input = cpu.channels_last(input)
        offset, mask = self.predict(input)
        taps = self.kernel_size[0] * self.kernel_size[1]
        if self.backend == "torchvision":
            from torchvision.ops import deform_conv2d as tv_deform_conv2d

            if self.offset_channels == "shared":
                offset = expand_shared_offset(offset, taps)
            return tv_deform_conv2d(
                input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
            )
        if self.offset_channels == "shared" and mask is None:
            return dispatch.deform_conv2d_shared(
                input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation
            )
        if self.offset_channels == "shared":
            offset = expand_shared_offset(offset, taps)
        return dispatch.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                      mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"offset_channels={self.offset_channels}, modulated={self.modulated}, "
            f"offset_groups={self.offset_groups}, backend={self.backend}"
        )
