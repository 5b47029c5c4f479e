"""Effective receptive field (Luo et al., 2016): where the input actually influences one output unit.

The map is |∂y/∂x|: y is the sum over channels of the last conv layer's output (the conv itself,
before its BN and ReLU) at the centre of its output plane — the central unit, or the 2×2 central units
when a side is even, so that the map is centred on the image — and x the normalised input image. The
absolute gradient is averaged over the three input channels and over val images, with the model in
eval mode (BN running statistics), and normalised to sum to 1.

Summary numbers: ``rms_radius_px``, the gradient-weighted root-mean-square distance (input pixels) of
the input pixels from the unit's centre; ``area50_frac`` / ``area90_frac``, the smallest fraction of
the image's pixels that holds 50% / 90% of the gradient mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harness.analysis.sampling import conv_geometry
from harness.errors import HarnessError


@dataclass
class ErfResult:
    map: np.ndarray  # [H, W], sums to 1
    centre: tuple[float, float]  # (y, x) image index coordinates of the output unit(s)
    layer: int  # conv index
    images: int

    def mass_fraction_area(self, mass: float) -> float:
        values = np.sort(self.map.ravel())[::-1]
        cumulative = np.cumsum(values)
        needed = int(np.searchsorted(cumulative, mass * cumulative[-1]) + 1)
        return min(needed, values.size) / values.size

    @property
    def rms_radius(self) -> float:
        h, w = self.map.shape
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        r2 = (yy - self.centre[0]) ** 2 + (xx - self.centre[1]) ** 2
        return float(np.sqrt((self.map * r2).sum() / max(self.map.sum(), 1e-300)))

    def metrics(self) -> dict[str, float]:
        return {
            "erf/rms_radius_px": self.rms_radius,
            "erf/area50_frac": self.mass_fraction_area(0.5),
            "erf/area90_frac": self.mass_fraction_area(0.9),
            "erf/layer": float(self.layer),
        }


def effective_receptive_field(
    model: nn.Module, images: torch.Tensor, layer: int = -1, batch_size: int = 32
) -> ErfResult:
    """The ERF of conv layer `layer` (default: the last) over normalised images [N, 3, H, W]."""
    geometry = conv_geometry(model, int(images.shape[-1]))
    if not geometry:
        raise HarnessError("the model has no conv layers")
    target = geometry[layer]
    if images.shape[0] == 0:
        raise HarnessError("no val images for the effective receptive field")
    model.eval()
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        captured["y"] = output

    handle = target.module.register_forward_hook(hook)
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].detach().clone().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            model(x)
            y = captured["y"]
            ho, wo = y.shape[-2:]
            rows = slice((ho - 1) // 2, ho // 2 + 1)
            cols = slice((wo - 1) // 2, wo // 2 + 1)
            (grad,) = torch.autograd.grad(y[:, :, rows, cols].sum(), x)
            total += grad.detach().abs().double().mean(dim=1).sum(dim=0).cpu()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    ho, wo = y.shape[-2:]
    centre_out = np.array([((ho - 1) // 2 + ho // 2) / 2.0, ((wo - 1) // 2 + wo // 2) / 2.0])
    centre = target.out_to_image(centre_out)
    erf = total.numpy()
    erf = erf / erf.sum() if erf.sum() > 0 else erf
    return ErfResult(erf.astype(np.float64), (float(centre[0]), float(centre[1])), target.index, int(images.shape[0]))
