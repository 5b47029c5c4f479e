"""The assignment's networks, and where their deformable layers go.

`unet_encoder` is the course assignment's network: 11 conv 3x3 layers (BN + ReLU each) in five
stages shaped like a UNet encoder (64-128-256-512-1024 channels times a width multiplier, max
pooling between stages), global average pooling and a 3-layer dense head. `small3` is the
assignment's small 3-conv baseline. Any conv layer can be made deformable: `deform_layers` is
"none", "all", "first:N", "last:N", "middle:N" or an explicit list of 0-based conv indices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError
from harness.ops import DeformConv2d

DeformSpec = str | Sequence[int]


@dataclass(frozen=True)
class DeformOptions:
    """Options passed through to every `DeformConv2d` of a network."""

    offset_channels: str = "per_tap"
    modulated: bool = False
    offset_groups: int = 1
    backend: str = "native"


def resolve_deform_layers(spec: DeformSpec, n_layers: int) -> list[int]:
    """Turn a placement ("none", "all", "first:2", "last:2", "middle:3", [0, 4]) into sorted indices."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "none":
            return []
        if text == "all":
            return list(range(n_layers))
        kind, _, count_text = text.partition(":")
        if kind in ("first", "last", "middle") and count_text.isdigit():
            count = int(count_text)
            if not 0 <= count <= n_layers:
                raise HarnessError(f"deform_layers {spec!r}: the network has {n_layers} conv layers")
            if kind == "first":
                return list(range(count))
            if kind == "last":
                return list(range(n_layers - count, n_layers))
            start = (n_layers - count) // 2
            return list(range(start, start + count))
        raise HarnessError(
            f"deform_layers {spec!r} is not one of none, all, first:N, last:N, middle:N or a list of indices"
        )
    indices = sorted({int(i) for i in spec})
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise HarnessError(f"deform_layers indices {bad} are outside 0..{n_layers - 1}")
    return indices


def _conv(in_ch: int, out_ch: int, deformable: bool, options: DeformOptions) -> nn.Module:
    if deformable:
        return DeformConv2d(
            in_ch, out_ch, 3, padding=1, bias=False,
            offset_channels=options.offset_channels,  # type: ignore[arg-type]
            modulated=options.modulated, offset_groups=options.offset_groups,
            backend=options.backend,  # type: ignore[arg-type]
        )
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)


class ConvBlock(nn.Sequential):
    """conv 3x3 (ordinary or deformable) → BN → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, deformable: bool, options: DeformOptions) -> None:
        super().__init__(_conv(in_ch, out_ch, deformable, options), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class MultiLabelCNN(nn.Module):
    """Stages of conv blocks with max pooling between them, then a 3-layer dense head → logits."""

    def __init__(
        self,
        stage_widths: Sequence[int],
        stage_depths: Sequence[int],
        num_classes: int,
        head_hidden: tuple[int, int],
        deform_layers: DeformSpec,
        options: DeformOptions,
        dropout: float,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.n_conv = sum(stage_depths)
        self.deform_indices = resolve_deform_layers(deform_layers, self.n_conv)
        layers: list[nn.Module] = []
        index, channels = 0, in_channels
        for stage, (width, depth) in enumerate(zip(stage_widths, stage_depths, strict=True)):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers.append(ConvBlock(channels, width, index in self.deform_indices, options))
                channels, index = width, index + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, head_hidden[0]), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(head_hidden[0], head_hidden[1]), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(head_hidden[1], num_classes),
        )
        self.min_input = 2 ** (len(stage_widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.min_input or x.shape[-2] < self.min_input:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than this network's {self.min_input} px minimum")
        return self.head(self.pool(self.features(x)))

    def conv_layers(self) -> list[nn.Module]:
        """The network's conv layers in order (nn.Conv2d or DeformConv2d)."""
        return [block[0] for block in self.features if isinstance(block, ConvBlock)]


UNET_ENCODER_DEPTHS = (2, 2, 2, 2, 3)
SMALL3_DEPTHS = (1, 1, 1)


def _scaled(widths: Sequence[int], multiplier: float) -> list[int]:
    return [max(4, int(round(w * multiplier))) for w in widths]


def unet_encoder(
    num_classes: int = 80, width: float = 0.25, deform_layers: DeformSpec = "none",
    options: DeformOptions | None = None, dropout: float = 0.2,
) -> MultiLabelCNN:
    """The assignment's 11-conv network; width=1 gives UNet's 64…1024 channels."""
    widths = _scaled([64, 128, 256, 512, 1024], width)
    return MultiLabelCNN(
        widths, UNET_ENCODER_DEPTHS, num_classes, (max(64, widths[-1]), max(32, widths[-1] // 2)),
        deform_layers, options or DeformOptions(), dropout,
    )


def small3(
    num_classes: int = 80, width: float = 1.0, deform_layers: DeformSpec = "none",
    options: DeformOptions | None = None, dropout: float = 0.2,
) -> MultiLabelCNN:
    """The assignment's small baseline: 3 conv layers (16-32-64 channels) and the same head."""
    widths = _scaled([16, 32, 64], width)
    return MultiLabelCNN(
        widths, SMALL3_DEPTHS, num_classes, (128, 64), deform_layers, options or DeformOptions(), dropout
    )


MODELS: dict[str, Callable[..., MultiLabelCNN]] = {"unet_encoder": unet_encoder, "small3": small3}
CONV_LAYERS: dict[str, int] = {"unet_encoder": sum(UNET_ENCODER_DEPTHS), "small3": sum(SMALL3_DEPTHS)}


def conv_layer_count(arch: str) -> int:
    """How many conv layers network `arch` has (what deform_layers indexes), without building it."""
    if arch not in CONV_LAYERS:
        raise HarnessError(f"unknown model arch {arch!r}; known: {', '.join(sorted(MODELS))}")
    return CONV_LAYERS[arch]


def create_model(arch: str, **kwargs: Any) -> MultiLabelCNN:
    """Build a registered network by name."""
    if arch not in MODELS:
        raise HarnessError(f"unknown model arch {arch!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[arch](**kwargs)
