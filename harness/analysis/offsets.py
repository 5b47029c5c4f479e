"""Offset statistics of every deformable layer on the val set, overall and by region.

Per deformable conv layer (units: pixels of the layer's *input plane*; multiply by `scale`, the plane's
downsampling factor, for input-image pixels):

- ``mean_abs``: mean length |Δp| = sqrt(Δy² + Δx²) of the offsets, over taps, offset groups, output
  positions and images.
- ``eff_dilation``: DCNv1's effective dilation: the mean distance between the sampling points of
  adjacent taps (horizontal and vertical neighbours in the k×k grid: 12 pairs for 3×3), averaged like
  ``mean_abs``. Zero offsets give exactly the conv's dilation; so does any offset shared by all taps.
- ``tap_spread``: mean distance of each tap's offset from the mean offset of its k×k taps: how much the
  kernel changes shape (exactly 0 for the shared 2-channel layout, which can only move it).
- ``mask_mean``: mean DCNv2 modulation (modulated layers only).
- the histogram of |Δp|: bins of 0.1 px from 0 to 8 px, plus one bin for 8 px and beyond.

Regions: each output position is labelled by the smallest ground-truth box (COCO boxes mapped into the
resized image) that contains its centre, else background. A box is *small* when its area is under
32²/(640·480) of the image's area, *large* above 96²/(640·480), else *medium*: COCO's 32² and 96² pixel
thresholds stated relative to a typical 640×480 COCO image, so the labels do not depend on the resize
mode or the image size the network was trained at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from harness.analysis.sampling import ConvGeometry, capture_offsets, conv_geometry

REGIONS = ("background", "small", "medium", "large")
COCO_IMAGE_AREA = 640 * 480
SMALL_FRACTION = 32**2 / COCO_IMAGE_AREA
LARGE_FRACTION = 96**2 / COCO_IMAGE_AREA
HIST_EDGES = np.round(np.linspace(0.0, 8.0, 81), 6)  # plus an overflow bin [8, inf)
STAT_COLUMNS = ["layer", "region", "scale", "dilation", "positions", "mean_abs", "eff_dilation", "tap_spread",
                "mask_mean"]


def box_region(area_fraction: float) -> int:
    """1 small, 2 medium, 3 large (index into REGIONS) for a box covering `area_fraction` of the image."""
    if area_fraction < SMALL_FRACTION:
        return 1
    if area_fraction < LARGE_FRACTION:
        return 2
    return 3


def region_map(boxes: np.ndarray, layer: ConvGeometry, out_hw: tuple[int, int], image_size: int) -> np.ndarray:
    """[Ho, Wo] region labels (index into REGIONS) of a layer's output positions for one image.

    `boxes` are x0, y0, x1, y1 in the resized S×S image's continuous pixel coordinates (pixel i spans
    [i, i+1)); a position's centre in those coordinates is its image index coordinate + 0.5.
    """
    ho, wo = out_hw
    labels = np.zeros((ho, wo), dtype=np.int8)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return labels
    uy, ux = np.meshgrid(np.arange(ho, dtype=np.float64), np.arange(wo, dtype=np.float64), indexing="ij")
    centres = layer.out_to_image(np.stack([uy, ux], axis=-1)) + 0.5  # [Ho, Wo, 2] (y, x)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best_area = np.full((ho, wo), np.inf)
    for (x0, y0, x1, y1), area in zip(boxes, areas, strict=True):
        if area <= 0:
            continue
        inside = (centres[..., 1] >= x0) & (centres[..., 1] < x1) & (centres[..., 0] >= y0) & (centres[..., 0] < y1)
        take = inside & (area < best_area)
        labels[take] = box_region(area / float(image_size) ** 2)
        best_area[take] = area
    return labels


def adjacent_distances(offsets: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Mean distance between the sampling points of adjacent taps: [..., K, 2, Ho, Wo] → [..., Ho, Wo].

    The difference of two taps' points is (base difference) + (offset difference), computed in that
    order, so that equal offsets give exactly the conv's dilation.
    """
    kh, kw = kernel
    grid = offsets.reshape(*offsets.shape[:-4], kh, kw, 2, *offsets.shape[-2:])
    dists = []
    if kw > 1:
        diff = grid[..., :, 1:, :, :, :] - grid[..., :, :-1, :, :, :]  # [..., kh, kw-1, 2, Ho, Wo]
        dy, dx = diff[..., 0, :, :], diff[..., 1, :, :] + dilation[1]
        dists.append(torch.sqrt(dy * dy + dx * dx).flatten(-4, -3))
    if kh > 1:
        diff = grid[..., 1:, :, :, :, :] - grid[..., :-1, :, :, :, :]
        dy, dx = diff[..., 0, :, :] + dilation[0], diff[..., 1, :, :]
        dists.append(torch.sqrt(dy * dy + dx * dx).flatten(-4, -3))
    if not dists:
        return torch.zeros(offsets.shape[:-4] + offsets.shape[-2:], dtype=offsets.dtype)
    return torch.cat(dists, dim=-3).mean(dim=-3)


def _region_sums(labels: torch.Tensor, values: torch.Tensor) -> list[float]:
    """Sum of `values` per region label (labels: flat region indices, values: same number of elements)."""
    return torch.bincount(labels, weights=values.flatten().double(), minlength=len(REGIONS)).tolist()


@dataclass
class _Accumulator:
    positions: int = 0
    abs_sum: float = 0.0
    dil_sum: float = 0.0
    spread_sum: float = 0.0
    mask_sum: float = 0.0
    mask_count: int = 0


@dataclass
class OffsetStats:
    """Per deformable layer and region: the numbers above, plus |Δp| histograms per layer."""

    table: pd.DataFrame  # STAT_COLUMNS; region "all" plus the four regions
    histograms: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> counts, len(HIST_EDGES)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: offset/conv<i>/<stat> (all positions) and offset/conv<i>/<region>/<stat>."""
        out: dict[str, float] = {}
        for row in self.table.itertuples(index=False):
            prefix = f"offset/conv{row.layer}" + ("" if row.region == "all" else f"/{row.region}")
            if row.region != "all":
                out[f"{prefix}/share"] = float(row.share)
            if row.positions == 0:
                continue
            for stat in ("mean_abs", "eff_dilation", "tap_spread"):
                out[f"{prefix}/{stat}"] = float(getattr(row, stat))
            if row.region == "all" and np.isfinite(row.mask_mean):
                out[f"{prefix}/mask_mean"] = float(row.mask_mean)
        return out

    def histogram_frame(self) -> pd.DataFrame:
        rows = []
        for layer, counts in sorted(self.histograms.items()):
            for i, count in enumerate(counts):
                lo = float(HIST_EDGES[i])
                hi = float(HIST_EDGES[i + 1]) if i + 1 < len(HIST_EDGES) else float("inf")
                rows.append({"layer": layer, "bin_lo": lo, "bin_hi": hi, "count": int(count)})
        return pd.DataFrame(rows, columns=["layer", "bin_lo", "bin_hi", "count"])


def offset_statistics(
    model: nn.Module,
    images: Sequence[torch.Tensor] | torch.Tensor,
    boxes: Sequence[np.ndarray],
    image_size: int,
    batch_size: int = 64,
) -> OffsetStats:
    """Offset statistics of `model`'s deformable layers over normalised images [N, 3, S, S].

    `boxes[n]` holds image n's boxes (x0, y0, x1, y1 in the S×S image). Streams over batches.
    """
    geometry = {g.index: g for g in conv_geometry(model, image_size)}
    deform = [i for i, g in geometry.items() if g.deformable]
    acc = {(i, r): _Accumulator() for i in deform for r in ("all", *REGIONS)}
    hist = {i: np.zeros(len(HIST_EDGES), dtype=np.int64) for i in deform}
    model.eval()
    n_images = len(images)
    for start in range(0, n_images, batch_size):
        x = images[start : start + batch_size]
        x = torch.stack(list(x)) if not isinstance(x, torch.Tensor) else x
        captured = capture_offsets(model, x)
        for index, (offset, mask) in captured.items():
            layer = geometry[index]
            off = offset.double().cpu()  # [B, G, K, 2, Ho, Wo]
            ho, wo = off.shape[-2:]
            length = torch.sqrt(off[:, :, :, 0] ** 2 + off[:, :, :, 1] ** 2)  # [B, G, K, Ho, Wo]
            mean_abs = length.mean(dim=(1, 2))  # [B, Ho, Wo]
            dil = adjacent_distances(off, layer.kernel, layer.dilation).mean(dim=1)
            centre = off.mean(dim=2, keepdim=True)
            spread_vec = off - centre
            spread = torch.sqrt(spread_vec[:, :, :, 0] ** 2 + spread_vec[:, :, :, 1] ** 2).mean(dim=(1, 2))
            mask_mean = mask.double().cpu().mean(dim=(1, 2)) if mask is not None else None
            counts = np.bincount(np.searchsorted(HIST_EDGES, length.flatten().numpy(), side="right") - 1,
                                 minlength=len(HIST_EDGES))
            hist[index] += counts[: len(HIST_EDGES)]
            labels = torch.from_numpy(np.stack([
                region_map(boxes[start + b], layer, (ho, wo), image_size) for b in range(off.shape[0])
            ])).flatten().long()
            counts_by_region = torch.bincount(labels, minlength=len(REGIONS)).tolist()
            sums = [_region_sums(labels, v) for v in (mean_abs, dil, spread)]
            mask_sums = _region_sums(labels, mask_mean) if mask_mean is not None else None
            for r, name in enumerate(REGIONS):
                for a in (acc[(index, name)], acc[(index, "all")]):
                    a.positions += counts_by_region[r]
                    a.abs_sum += sums[0][r]
                    a.dil_sum += sums[1][r]
                    a.spread_sum += sums[2][r]
                    if mask_sums is not None:
                        a.mask_sum += mask_sums[r]
                        a.mask_count += counts_by_region[r]
    rows = []
    for index in deform:
        layer = geometry[index]
        total = max(acc[(index, "all")].positions, 1)
        for name in ("all", *REGIONS):
            a = acc[(index, name)]
            n = a.positions
            rows.append({
                "layer": index, "region": name, "scale": float(layer.in_scale[0]),
                "dilation": float(layer.dilation[0]), "positions": n,
                "share": n / total,
                "mean_abs": a.abs_sum / n if n else float("nan"),
                "eff_dilation": a.dil_sum / n if n else float("nan"),
                "tap_spread": a.spread_sum / n if n else float("nan"),
                "mask_mean": a.mask_sum / a.mask_count if a.mask_count else float("nan"),
            })
    table = pd.DataFrame(rows, columns=[*STAT_COLUMNS[:5], "share", *STAT_COLUMNS[5:]])
    return OffsetStats(table, hist)
