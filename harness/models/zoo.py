"""Networks from outside the harness: torchvision's ResNets, a user's factory, and pretrained weights for them.

ResNets keep torchvision's structure and parameter names with a `num_classes`-logit `fc`, so that
torchvision's ImageNet weights load by name (all but the classifier). Stages follow the detection
literature's names: c2..c5 are `layer1`..`layer4` (c1, the 7×7 stem, has no 3×3 conv).

Pretrained weights are never downloaded: a weights name (``ResNet18_Weights.IMAGENET1K_V1``) resolves to
the file torchvision itself would cache, ``torch.hub.get_dir()/checkpoints/<file name of its url>``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError, one_line

RESNET_STAGES: dict[str, str] = {"c2": "layer1.", "c3": "layer2.", "c4": "layer3.", "c5": "layer4."}
RESNETS = ("resnet18", "resnet34", "resnet50")
WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")


def is_factory_ref(arch: str) -> bool:
    """`package.module:factory`: a user's network."""
    module, sep, attr = arch.partition(":")
    return bool(sep and module and attr.isidentifier() and all(p.isidentifier() for p in module.split(".")))


def resnet(arch: str, num_classes: int) -> nn.Module:
    """torchvision's `arch` with a `num_classes`-logit fc (randomly initialised as torchvision does)."""
    from torchvision import models as tv_models  # on use: importing torchvision costs a second per process

    return getattr(tv_models, arch)(weights=None, num_classes=num_classes)


def load_factory(arch: str) -> Callable[..., Any]:
    """Import `package.module:factory`; a one-line error when it is not there."""
    module_name, _, attr = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ModuleNotFoundError, or the user's module failing on import
        raise HarnessError(f"model.arch {arch!r}: cannot import {module_name}: {one_line(exc, with_type=False)} "
                           "(is it installed or on PYTHONPATH?)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise HarnessError(f"model.arch {arch!r}: {module_name} has no callable {attr!r}")
    return factory


def from_factory(arch: str, num_classes: int) -> nn.Module:
    """Call a user's factory (with num_classes=… when it takes it); it must return an nn.Module."""
    factory = load_factory(arch)
    try:
        params = inspect.signature(factory).parameters
        takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes = False
    try:
        model = factory(num_classes=num_classes) if takes else factory()
    except HarnessError:
        raise
    except Exception as exc:
        raise HarnessError(f"model.arch {arch!r}: the factory raised {one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise HarnessError(f"model.arch {arch!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def hub_checkpoint(name: str) -> tuple[Path, str]:
    """Where torchvision caches weights `name` (hub dir/checkpoints/<file name of the url>) and the url."""
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise HarnessError(f"model.pretrained {name!r} is not a torchvision weights name "
                           f"({one_line(exc, with_type=False)})") from None
    url = str(weights.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def pretrained_file(value: str) -> Path:
    """The local file `model.pretrained` names; a one-line error saying where to put it when it is missing."""
    if WEIGHTS_NAME.match(value) and not Path(value).expanduser().exists():
        path, url = hub_checkpoint(value)
        if not path.is_file():
            raise HarnessError(f"model.pretrained {value}: {path} does not exist; nothing is downloaded, "
                               f"put the file from {url} there")
        return path
    path = Path(value).expanduser()
    if not path.is_file():
        raise HarnessError(f"model.pretrained: no weights file at {path}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file (tensors only: weights_only=True); a harness checkpoint's `model` too."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = one_line(exc, with_type=False).removeprefix("Weights only load failed. ")
        raise HarnessError(f"model.pretrained: {path} cannot be loaded: {reason}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HarnessError(f"model.pretrained: {path} does not hold a state dict of tensors")
    return dict(state)


def classifier_prefix(model: nn.Module) -> str | None:
    """The module name (with a trailing dot) of the classifier whose weights are not loaded: resnet `fc`,
    the harness networks' `head`, else the last nn.Linear."""
    names = dict(model.named_modules())
    for name in ("fc", "head"):
        if name in names:
            return name + "."
    linears = [name for name, m in names.items() if isinstance(m, nn.Linear)]
    return linears[-1] + "." if linears else None


def load_pretrained(model: nn.Module, path: Path) -> int:
    """Load every weight of `path` but the classifier's into `model`; the count loaded. Missing or extra
    keys, or a shape that differs, are one-line errors: the file is for another network."""
    state = read_state_dict(path)
    head = classifier_prefix(model)
    own = model.state_dict()

    def kept(key: str) -> bool:  # offset predictors start at zero whatever the file holds
        return not (head and key.startswith(head)) and ".offset_predictor." not in f".{key}"

    missing = [k for k in own if kept(k) and k not in state]
    extra = [k for k in state if kept(k) and k not in own]
    wrong = [k for k in state if kept(k) and k in own and own[k].shape != state[k].shape]
    for label, keys in (("missing", missing), ("unexpected", extra), ("of another shape", wrong)):
        if keys:
            raise HarnessError(f"model.pretrained: {path} does not fit this network: {len(keys)} weights "
                               f"{label} (e.g. {', '.join(keys[:3])})")
    loadable = {k: v for k, v in state.items() if kept(k)}
    model.load_state_dict(loadable, strict=False)
    return len(loadable)
