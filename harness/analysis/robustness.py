"""Robustness of a trained model to controlled geometric transforms of its val images.

Each transform family is a 2×2 linear map A about the image centre, applied to the *normalised* val
images (what the network sees) with `affine_grid`/`grid_sample` (bilinear, ``align_corners=False``,
zero padding). Zero in normalised space is the ImageNet mean colour, so the corners a rotation or a
zoom-out uncovers read as a flat mean-grey background, the same value the network's own zero padding
feeds its first layer. The identity magnitude of every family returns the images untouched (no
resampling), so it reproduces `harness.train.evaluate` on the val set exactly.

Families and magnitudes (A maps image content to its new place; images are square):

- ``rotation``: degrees, counter-clockwise on screen: A = [[cos θ, sin θ], [−sin θ, cos θ]] on (x, y↓).
- ``scale``: objects appear s times as large (s < 1 zooms out, leaving a grey border): A = s·I.
- ``stretch``: aspect-ratio change r with the area kept: x × √r, y ÷ √r.
- ``shear``: horizontal shear by angle φ (degrees): x' = x + tan φ · y.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.tracking import names
from harness.train import evaluate

FAMILIES: dict[str, tuple[float, ...]] = {
    "rotation": (0, 15, 30, 45, 60, 90),
    "scale": (0.5, 0.75, 1.0, 1.25, 1.5),
    "stretch": (1.0, 1.25, 1.5, 2.0, 2.5),
    "shear": (0, 10, 20, 30, 40),
}
IDENTITY = {"rotation": 0.0, "scale": 1.0, "stretch": 1.0, "shear": 0.0}
UNITS = {"rotation": "degrees", "scale": "× size", "stretch": "aspect ratio", "shear": "degrees"}
METRICS = ("map", "micro_f1", "macro_f1")


def magnitude_label(value: float) -> str:
    """How a magnitude appears in metric names: 30, 0.5, 1.25 (MLflow-legal: digits, '.', '-')."""
    return f"{float(value):g}"


def content_matrix(family: str, magnitude: float) -> np.ndarray:
    """The 2×2 map A (on x, y with y pointing down) that moves image content for this transform."""
    m = float(magnitude)
    if family == "rotation":
        t = math.radians(m)
        return np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    if family == "scale":
        if m <= 0:
            raise HarnessError(f"scale magnitude {m:g} must be positive")
        return np.array([[m, 0.0], [0.0, m]])
    if family == "stretch":
        if m <= 0:
            raise HarnessError(f"stretch magnitude {m:g} must be positive")
        r = math.sqrt(m)
        return np.array([[r, 0.0], [0.0, 1.0 / r]])
    if family == "shear":
        if not -89 < m < 89:
            raise HarnessError(f"shear magnitude {m:g} must be an angle between -89 and 89 degrees")
        return np.array([[1.0, math.tan(math.radians(m))], [0.0, 1.0]])
    raise HarnessError(f"unknown transform family {family!r}; known: {', '.join(FAMILIES)}")


def is_identity(family: str, magnitude: float) -> bool:
    return bool(np.array_equal(content_matrix(family, magnitude), np.eye(2)))


def warp(x: torch.Tensor, family: str, magnitude: float) -> torch.Tensor:
    """Apply the transform to a batch [B, C, H, W] (zero padding); the identity returns `x` itself."""
    a = content_matrix(family, magnitude)
    if np.array_equal(a, np.eye(2)):
        return x
    inverse = np.linalg.inv(a)  # affine_grid maps output coordinates to input coordinates
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, :, :2] = torch.as_tensor(inverse, dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class WarpedLoader:
    """Iterates an (x, y) loader with every x warped: what `harness.train.evaluate` consumes."""

    def __init__(self, loader: object, family: str, magnitude: float) -> None:
        self.loader, self.family, self.magnitude = loader, family, magnitude

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:  # type: ignore[attr-defined]
            yield warp(x, self.family, self.magnitude), y

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def check_families(families: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """Validate families/magnitudes; every family gets its identity magnitude (the reference) first."""
    out: dict[str, tuple[float, ...]] = {}
    for family, magnitudes in families.items():
        if family not in FAMILIES:
            raise HarnessError(f"unknown transform family {family!r}; known: {', '.join(FAMILIES)}")
        values = [float(m) for m in magnitudes]
        for m in values:
            content_matrix(family, m)
        ident = IDENTITY[family]
        out[family] = tuple(sorted(set(values) | {ident}))
    return out


def robustness(
    model: nn.Module,
    loader: object,
    families: Mapping[str, Sequence[float]] = FAMILIES,
    progress: object | None = None,
) -> pd.DataFrame:
    """Evaluate `model` on `loader` under every transform: rows family, magnitude, index, map, micro_f1, ...

    `index` is the magnitude's position in its family (sorted). `rel_map` is mAP relative to the
    family's identity magnitude (1.0 = no loss). `progress(done, total)` is called after each evaluation.
    """
    checked = check_families(families)
    total = sum(len(v) for v in checked.values())
    rows = []
    done = 0
    untransformed: dict[str, float] | None = None  # every family's identity is the same evaluation: run it once
    for family, magnitudes in checked.items():
        for index, magnitude in enumerate(magnitudes):
            if is_identity(family, magnitude):
                if untransformed is None:
                    untransformed = evaluate(model, loader)  # type: ignore[arg-type]
                metrics = untransformed
            else:
                metrics = evaluate(model, WarpedLoader(loader, family, magnitude))  # type: ignore[arg-type]
            rows.append({
                "family": family, "magnitude": magnitude, "index": index,
                "identity": is_identity(family, magnitude),
                "loss": metrics[names.VAL_LOSS], **{m: metrics[names.val_of(m)] for m in METRICS},
            })
            done += 1
            if callable(progress):
                progress(done, total)
    frame = pd.DataFrame(rows)
    ref = frame[frame["identity"]].set_index("family")["map"]
    frame["rel_map"] = [r / ref[f] if ref[f] > 0 else float("nan") for f, r in zip(frame["family"], frame["map"],
                                                                                       strict=True)]
    return frame


def robustness_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """MLflow metrics: robust/<family>/<magnitude>/<metric> and robust/<family>/mean_map_drop."""
    out: dict[str, float] = {}
    for row in frame.itertuples(index=False):
        point = f"{names.ROBUST_PREFIX}{row.family}/{magnitude_label(row.magnitude)}"
        for metric in METRICS:
            out[f"{point}/{metric}"] = float(getattr(row, metric))
    for family, part in frame.groupby("family", sort=False):
        moved = part[~part["identity"]]
        if len(moved) and np.isfinite(moved["rel_map"]).all():
            out[f"{names.ROBUST_PREFIX}{family}/mean_map_drop"] = float(1.0 - moved["rel_map"].mean())
    return out
