"""Figures of the analysis: PNG artifacts for MLflow (per run) and SVG for the report section.

Matplotlib with the Agg backend. User strings (variant and group names, class names) reach matplotlib
only through `safe_text` (mathtext off, bounded length); matplotlib's SVG writer escapes <, > and & in
its text elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from harness.figures import safe_text

RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "harness-analysis",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}
FINAL_COLOUR, MIDDLE_COLOUR, CENTRE_COLOUR = "#ff2020", "#00d0ff", "#ffe000"


# --------------------------------------------------------------------------------------- sampling


@dataclass
class SamplingPanel:
    """One image and one output position: the fixed grid's and the learned sampling points."""

    image: np.ndarray  # [H, W, 3] uint8
    fixed: list[np.ndarray]  # levels of points in image index coordinates (y, x): [1,2], [K,2], [K²,2]
    learned: list[np.ndarray]
    label: str  # what the position is on, e.g. "val image 3: on dog (large)"
    row: int = 0  # figure row (one per image)
    slot: int = 0  # position within the row (0: on an object, 1: on background)


def _draw_points(ax: plt.Axes, image: np.ndarray, levels: Sequence[np.ndarray], window: tuple[float, ...]) -> None:
    h, w = image.shape[:2]
    ax.imshow(image, interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    final = levels[-1]
    ax.scatter(final[:, 1], final[:, 0], s=9, c=FINAL_COLOUR, edgecolors="black", linewidths=0.3, zorder=3)
    if len(levels) > 2:
        middle = levels[-2]
        ax.scatter(middle[:, 1], middle[:, 0], s=30, marker="s", facecolors="none", edgecolors=MIDDLE_COLOUR,
                   linewidths=1.2, zorder=4)
    centre = levels[0]
    ax.scatter(centre[:, 1], centre[:, 0], s=110, marker="*", c=CENTRE_COLOUR, edgecolors="black",
               linewidths=0.6, zorder=5)
    x0, x1, y0, y1 = window
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.5)


def _window(image: np.ndarray, levels: Sequence[np.ndarray], zoom: bool) -> tuple[float, float, float, float]:
    h, w = image.shape[:2]
    if not zoom:
        return (-0.5, w - 0.5, -0.5, h - 0.5)
    pts = np.concatenate(list(levels), axis=0)
    cy, cx = levels[0][0]
    half = max(np.abs(pts[:, 0] - cy).max(), np.abs(pts[:, 1] - cx).max()) + 2.0
    half = max(half, 6.0)
    # keep the window inside the image where it fits, so that no blank margin shows
    lo_x = min(max(cx - half, -0.5), max(w - 0.5 - 2 * half, -0.5)) if 2 * half <= w else cx - half
    lo_y = min(max(cy - half, -0.5), max(h - 0.5 - 2 * half, -0.5)) if 2 * half <= h else cy - half
    return (lo_x, lo_x + 2 * half, lo_y, lo_y + 2 * half)


def sampling_figure(panels: Sequence[SamplingPanel], chain: Sequence[int], title: str) -> plt.Figure:
    """Per position three panels: where it is (whole image, zoom window outlined), the fixed grid of the
    same layers without offsets, and the learned sampling points, both zoomed to the same window (white
    beyond the image's border: what the layers read there is zero padding). One row per image."""
    from matplotlib.patches import Rectangle

    with plt.rc_context(RC):
        rows = max([p.row for p in panels], default=0) + 1
        per_row = max([p.slot for p in panels], default=0) + 1
        cols = 3 * per_row
        fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.25 * rows + 0.7), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for panel in panels:
            r, c0 = panel.row, panel.slot
            both = [*panel.fixed, *panel.learned]
            zoom = _window(panel.image, both, zoom=True)
            full = _window(panel.image, both, zoom=False)
            ax = axes[r, 3 * c0]
            ax.axis("on")
            _draw_points(ax, panel.image, panel.fixed[:1], full)
            x0, x1, y0, y1 = zoom
            h, w = panel.image.shape[:2]
            if x0 > -0.5 or y0 > -0.5 or x1 < w - 0.5 or y1 < h - 0.5:  # the zoom shows part of the image
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2,
                                       linestyle="--", zorder=6))
            ax.set_title(safe_text(panel.label, 44), fontsize=8, pad=3, loc="left")
            for j, (levels, name) in enumerate(((panel.fixed, "fixed grid (no offsets)"),
                                                (panel.learned, "learned offsets"))):
                ax = axes[r, 3 * c0 + 1 + j]
                ax.axis("on")
                _draw_points(ax, panel.image, levels, zoom)
                ax.set_title(name, fontsize=8, pad=3)
        k = len(chain)
        layers = " → ".join(f"conv{i}" for i in sorted(chain, reverse=True))
        handles = [
            Line2D([], [], marker="*", ls="", color=CENTRE_COLOUR, markeredgecolor="black", markersize=10,
                   label=f"output unit of conv{max(chain)}"),
            Line2D([], [], marker="s", ls="", markerfacecolor="none", markeredgecolor=MIDDLE_COLOUR,
                   markersize=6, label=f"its 9 samples (conv{max(chain)})"),
            Line2D([], [], marker="o", ls="", color=FINAL_COLOUR, markeredgecolor="black", markersize=4,
                   label=f"their {9 ** k} samples in the input image ({layers})"),
        ]
        if k == 1:
            handles.pop(1)
        fig.suptitle(safe_text(title, 120), fontsize=10)
        fig.legend(handles=handles, loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.0), fontsize=8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        return fig


# ------------------------------------------------------------------------------------------- ERF


def mass_level(erf: np.ndarray, mass: float) -> float:
    """The value v such that the pixels >= v hold `mass` of the map's total."""
    values = np.sort(erf.ravel())[::-1]
    cumulative = np.cumsum(values)
    if cumulative[-1] <= 0:
        return 0.0
    return float(values[min(int(np.searchsorted(cumulative, mass * cumulative[-1])), values.size - 1)])


def erf_figure(maps: Sequence[np.ndarray], titles: Sequence[str], centres: Sequence[tuple[float, float]],
               subtitle: str = "") -> plt.Figure:
    """One heatmap per ERF map (each normalised to its own maximum), the unit's centre marked."""
    with plt.rc_context(RC):
        n = max(1, len(maps))
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.8, 3.0), squeeze=False)
        for ax, erf, title, centre in zip(axes[0], maps, titles, centres, strict=False):
            peak = float(np.max(erf)) or 1.0
            image = ax.imshow(erf / peak, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            levels = sorted({mass_level(erf, 0.9) / peak, mass_level(erf, 0.5) / peak})
            if len(levels) == 2 and levels[0] < levels[1] < 1:
                ax.contour(erf / peak, levels=levels, colors=["#7fdbff", "white"], linewidths=0.9,
                           linestyles=["dashed", "solid"])
            ax.plot([centre[1]], [centre[0]], marker="+", color="#00e5ff", markersize=9, mew=1.5)
            ax.set_title(safe_text(title, 45), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if subtitle:
            fig.suptitle(safe_text(subtitle, 120), fontsize=9)
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="|∂y/∂x| / max")
        fig.text(0.45, 0.04, "contours hold 50% (solid) and 90% (dashed) of the gradient mass; + the output unit",
                 fontsize=7, ha="center")
        return fig


# ------------------------------------------------------------------------------------ histograms


def histogram_figure(hists: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> plt.Figure:
    """|Δp| histograms as density lines, one per label: {label: (bin_lo [B], counts [B])}."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(5.2, 2.8))
        right = 0.5
        for label, (lo, counts) in hists.items():
            total = counts.sum()
            if total <= 0:
                continue
            width = float(np.diff(lo).min()) if len(lo) > 1 else 1.0
            edges = np.append(lo, lo[-1] + width)
            ax.stairs(counts / total, edges, label=safe_text(label, 50), linewidth=1.3)
            nonzero = np.flatnonzero(counts)
            right = max(right, float(edges[nonzero[-1] + 1]))
        ax.set_xlim(0, right * 1.05)
        ax.set_xlabel("|Δp| (pixels of the layer's input plane; last bin: ≥ 8)")
        ax.set_ylabel("share of taps")
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(safe_text(title, 100))
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig
