"""One way to build the network of a run, whatever its architecture: `build_network`.

`model.arch` is one of the harness's own networks (`unet_encoder`, `small3`), a torchvision ResNet
(`resnet18`, `resnet34`, `resnet50`), or a user's factory (`package.module:factory`). The deformable
layers are placed by `deform_layers` (indices, "all", "first:N", ..., or for ResNets stages such as
"c3-c5") or by `deform_modules` (module-name globs). Every built network carries `deform_indices` (which
of its conv layers are deformable) and `conv_names` (the names of its conv layers, `conv<i>`'s name).
`check_network` does the same placement on a weightless copy (meta device) so that a config is refused
before anything trains.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.cnn import MODELS, DeformOptions, create_model
from harness.models.convert import PlacementSpec, conv_layers, make_deformable, select_convs
from harness.models.zoo import (
    RESNET_STAGES,
    RESNETS,
    from_factory,
    is_factory_ref,
    load_pretrained,
    pretrained_file,
    resnet,
)
from harness.ops import DeformConv2d


class NetworkSpec(Protocol):
    """What `build_network` reads (the fields of `harness.config.ModelConfig`)."""

    arch: str
    width: float
    deform_layers: PlacementSpec
    deform_modules: Sequence[str]
    offset_channels: str
    modulated: bool
    offset_groups: int
    backend: str
    dropout: float
    pretrained: str | None


def known_arch(arch: str) -> bool:
    """A harness network, a supported ResNet, or the `package.module:factory` form."""
    return arch in MODELS or arch in RESNETS or is_factory_ref(arch)


def arch_names() -> list[str]:
    return sorted(MODELS) + list(RESNETS) + ["package.module:factory"]


def stages_of(arch: str) -> dict[str, str]:
    """Stage name → module-name prefix, for the networks that have named stages."""
    return dict(RESNET_STAGES) if arch in RESNETS else {}


def options_of(spec: NetworkSpec) -> DeformOptions:
    return DeformOptions(spec.offset_channels, spec.modulated, spec.offset_groups, spec.backend)


def _base(spec: NetworkSpec, num_classes: int) -> nn.Module:
    """The network before placement (the harness's own ones already placed when no globs are given)."""
    if spec.arch in MODELS:
        placement = "none" if spec.deform_modules else spec.deform_layers
        if not isinstance(placement, str) and any(isinstance(i, str) for i in placement):
            raise HarnessError(f"deform_layers {list(placement)}: stage names apply to the resnet archs only")
        return create_model(spec.arch, num_classes=num_classes, width=spec.width, deform_layers=placement,
                            options=options_of(spec), dropout=spec.dropout)
    if spec.arch in RESNETS:
        return resnet(spec.arch, num_classes)
    if is_factory_ref(spec.arch):
        return from_factory(spec.arch, num_classes)
    raise HarnessError(f"unknown model arch {spec.arch!r}; known: {', '.join(arch_names())}")


def build_network(spec: NetworkSpec, num_classes: int, *, load_pretrained_weights: bool = True) -> nn.Module:
    """The network of `spec` with `num_classes` logits, its chosen convs deformable (offsets at zero).

    Pretrained weights (`spec.pretrained`) are loaded before the convs are converted, so the deformable
    layers start from them; `load_pretrained_weights=False` skips them (a checkpoint will overwrite them).
    """
    model = _base(spec, num_classes)
    if spec.pretrained and load_pretrained_weights:
        load_pretrained(model, pretrained_file(spec.pretrained))
    if spec.arch in MODELS and not spec.deform_modules:
        indices = [i for i, (_, m) in enumerate(conv_layers(model)) if isinstance(m, DeformConv2d)]
    else:
        options = options_of(spec)
        indices = select_convs(model, spec.deform_layers, spec.deform_modules, stages_of(spec.arch), options)
        make_deformable(model, indices, options)
    model.deform_indices = indices
    model.conv_names = [name for name, _ in conv_layers(model)]
    return model


@functools.lru_cache(maxsize=256)
def _placement(
    arch: str, width: float, layers_json: str, modules: tuple[str, ...], offset_groups: int
) -> tuple[str, ...]:
    spec = _Spec(arch, width, json.loads(layers_json), modules, offset_groups)
    try:
        with torch.device("meta"):
            model = build_network(spec, 2, load_pretrained_weights=False)
    except HarnessError:
        raise
    except Exception:  # a user's factory that needs real tensors: build it for real
        model = build_network(spec, 2, load_pretrained_weights=False)
    return tuple(deformable_names(model))


class _Spec:
    """The placement-relevant part of a spec (the rest at defaults)."""

    def __init__(self, arch: str, width: float, layers: PlacementSpec, modules: tuple[str, ...], groups: int) -> None:
        self.arch, self.width, self.deform_layers, self.deform_modules = arch, width, layers, modules
        self.offset_channels, self.modulated, self.offset_groups, self.backend = "per_tap", False, groups, "native"
        self.dropout, self.pretrained = 0.0, None


def check_network(spec: NetworkSpec) -> list[str]:
    """The names of the convs `spec` makes deformable, found on a weightless copy; a one-line error for
    an unknown factory, a pattern that matches nothing, or a conv the deformable layer does not support."""
    return list(_placement(spec.arch, float(spec.width), json.dumps(spec.deform_layers),
                           tuple(spec.deform_modules), int(spec.offset_groups)))


def deformable_names(model: nn.Module) -> list[str]:
    """Names of the model's deformable conv layers, in order."""
    return [name for name, m in conv_layers(model) if isinstance(m, DeformConv2d)]
