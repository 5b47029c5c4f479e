"""Turning the 3×3 convolutions of any network into `DeformConv2d`, chosen by index, stage or name pattern.

A network's *conv layers* are its `nn.Conv2d` and `DeformConv2d` modules in registration order
(`named_modules`, which is execution order for torchvision's ResNets); `conv<i>` in the analysis and
`deform_layers: [i, ...]` index this list. Only 3×3 convolutions with zero padding can become
deformable: "all", "first:N", "last:N" and "middle:N" count among those, stages ("c3-c5") pick those of
a ResNet's stages, `deform_modules` globs (fnmatch) pick them by module name. A converted layer keeps the
conv's weights, bias, stride, padding, dilation and groups, and its offsets start at zero, so an
unmodulated network computes exactly what it computed before.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

from torch import nn

from harness.errors import HarnessError
from harness.models.cnn import DeformOptions, DeformSpec, resolve_deform_layers
from harness.ops import DeformConv2d

PlacementSpec = str | Sequence[int] | Sequence[str]
STAGE_PATTERN = re.compile(r"^c(\d)(?:-c(\d))?$")


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv layer, in registration order (a deformable layer's own offset predictor
    is part of that layer, not a conv layer of the network)."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, DeformConv2d):
            inside.append(name + ".")
            out.append((name, module))
        elif isinstance(module, nn.Conv2d):
            out.append((name, module))
    return out


def unsupported_reason(conv: nn.Module, options: DeformOptions) -> str | None:
    """Why `conv` cannot become a `DeformConv2d` with `options` (None when it can)."""
    if isinstance(conv, DeformConv2d):
        return None
    if not isinstance(conv, nn.Conv2d):
        return f"is a {type(conv).__name__}, not a Conv2d"
    if tuple(conv.kernel_size) != (3, 3):
        return f"is a {conv.kernel_size[0]}×{conv.kernel_size[1]} conv, only 3×3 convs can be deformable"
    if conv.padding_mode != "zeros":
        return f"pads with {conv.padding_mode!r}, the deformable layer pads with zeros"
    if isinstance(conv.padding, str):
        return f"has padding={conv.padding!r}; the deformable layer needs explicit padding"
    if conv.in_channels % options.offset_groups:
        return f"has {conv.in_channels} input channels, not divisible by offset_groups={options.offset_groups}"
    return None


def is_candidate(conv: nn.Module) -> bool:
    """A conv that some deformable layer could replace (3×3, zero padding)."""
    return unsupported_reason(conv, DeformOptions()) is None


def parse_stages(spec: PlacementSpec, stages: Mapping[str, str]) -> list[str] | None:
    """Stage names ("c5", "c3-c5", ["c4", "c5"]) → the module-name prefixes of those stages; None when
    `spec` is not a stage spec."""
    if isinstance(spec, str):
        match = STAGE_PATTERN.match(spec.strip().lower())
        if match is None:
            return None
        low, high = int(match[1]), int(match[2] or match[1])
        names = [f"c{i}" for i in range(low, high + 1)]
        if not names:
            raise HarnessError(f"deform_layers {spec!r}: an empty range of stages")
    elif spec and all(isinstance(s, str) for s in spec):
        names = [str(s).strip().lower() for s in spec]
    else:
        return None
    if not stages:
        raise HarnessError(f"deform_layers {spec!r}: stage names apply to the resnet archs only")
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise HarnessError(f"deform_layers {spec!r}: unknown stage {unknown[0]!r}; stages: {', '.join(stages)}")
    return [stages[n] for n in names]


def _by_patterns(convs: list[tuple[str, nn.Module]], patterns: Sequence[str], model: nn.Module) -> list[int]:
    chosen: set[int] = set()
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        hits = [i for i, (name, _) in enumerate(convs) if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            near = "it matches modules but no conv" if fnmatch.filter(names, pattern) else "it matches no module"
            raise HarnessError(f"deform_modules pattern {pattern!r}: {near} (convs: {_few(convs)})")
        chosen.update(hits)
    return sorted(chosen)


def _few(convs: list[tuple[str, nn.Module]], limit: int = 6) -> str:
    names = [name for name, _ in convs]
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def select_convs(
    model: nn.Module, deform_layers: PlacementSpec, deform_modules: Sequence[str] = (),
    stages: Mapping[str, str] | None = None, options: DeformOptions | None = None,
) -> list[int]:
    """Indices into `conv_layers(model)` of the convs to make deformable; a one-line error for a placement the
    network does not have or a chosen conv the deformable layer does not support."""
    options = options or DeformOptions()
    convs = conv_layers(model)
    placement_set = not (isinstance(deform_layers, str) and deform_layers.strip().lower() == "none")
    if deform_modules and placement_set:
        raise HarnessError("set either deform_layers or deform_modules, not both")
    candidates = [i for i, (_, conv) in enumerate(convs) if is_candidate(conv)]
    if deform_modules:
        chosen = _by_patterns(convs, deform_modules, model)
    elif (prefixes := parse_stages(deform_layers, stages or {})) is not None:
        chosen = [i for i in candidates if any(convs[i][0].startswith(p) for p in prefixes)]
    elif isinstance(deform_layers, str):
        picked: DeformSpec = deform_layers
        chosen = [candidates[i] for i in resolve_deform_layers(picked, len(candidates))]
    else:
        chosen = resolve_deform_layers([int(i) for i in deform_layers], len(convs))
    for index in chosen:
        name, conv = convs[index]
        reason = unsupported_reason(conv, options)
        if reason is not None:
            raise HarnessError(f"conv{index} ({name}) cannot be made deformable: it {reason}")
    return chosen


def make_deformable(model: nn.Module, indices: Sequence[int], options: DeformOptions) -> list[str]:
    """Replace the convs at `indices` (of `conv_layers(model)`) by `DeformConv2d`s with their weights; their names."""
    convs = conv_layers(model)
    names = []
    for index in indices:
        name, conv = convs[index]
        if isinstance(conv, DeformConv2d):
            names.append(name)
            continue
        layer = DeformConv2d.from_conv(
            conv, offset_channels=options.offset_channels, modulated=options.modulated,  # type: ignore[arg-type]
            offset_groups=options.offset_groups, backend=options.backend,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer)
        names.append(name)
    return names
