"""Matplotlib figures for the report, returned as inline SVG strings (Agg backend, text kept as text).

User strings (variant and group names) reach matplotlib only through `harness.figures.safe_text`, which
turns off mathtext (`$`); matplotlib's SVG writer escapes `<`, `>` and `&` in <text>. Element ids are
prefixed per figure so several SVGs can live in one HTML page.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from scipy import stats as st

from harness.figures import fig_to_svg, safe_text
from harness.tracking import names as tracking_names

BASELINE_COLOUR = "#3d3d3d"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
DEFORM_COLOUR = "#e8590c"
OTHER_OP_COLOUR = "#8da0b6"
CURVE_PANELS = (
    (tracking_names.TRAIN_LOSS, "train loss"),
    (tracking_names.VAL_LOSS, "val loss"),
    (tracking_names.VAL_MICRO_F1, "val F1 (micro)"),
    (tracking_names.VAL_MAP, "val mAP"),
)
_FINAL_MAP = tracking_names.final_of(tracking_names.VAL_MAP)
_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "harness-report",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
}


def colours_for(variants: Sequence[str], baseline: str | None) -> dict[str, str]:
    """A stable colour per variant: the baseline dark grey, the others from a qualitative palette."""
    out: dict[str, str] = {baseline: BASELINE_COLOUR} if baseline is not None and baseline in variants else {}
    others = [v for v in variants if v != baseline]
    for v, c in zip(others, itertools.cycle(PALETTE), strict=False):
        out[v] = c
    return out


def _new(rows: int, cols: int, width: float, row_height: float, **kw: object) -> tuple[plt.Figure, np.ndarray]:
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(rows, cols, figsize=(width, row_height * rows), squeeze=False, **kw)
    return fig, axes


def _legend_handles(colours: Mapping[str, str], baseline: str | None) -> list[Line2D]:
    return [
        Line2D([], [], color=c, lw=2.2, label=safe_text(v + (" (baseline)" if v == baseline else "")))
        for v, c in colours.items()
    ]


def learning_curves(
    curves: pd.DataFrame, groups: pd.DataFrame, colours: Mapping[str, str], baseline: str | None
) -> str | None:
    """Mean per epoch with a ±1 std band per group; one row of panels per grid point."""
    if curves.empty or groups.empty:
        return None
    with plt.rc_context(_RC):
        points = groups.drop_duplicates("point_rank").sort_values("point_rank")
        fig, axes = _new(len(points), len(CURVE_PANELS), 13.0, 2.5, sharex=True)
        by_key = {k: part for k, part in curves.groupby("key")}
        for r, point in enumerate(points.itertuples(index=False)):
            members = groups[groups["point_rank"] == point.point_rank]
            for c, (key, title) in enumerate(CURVE_PANELS):
                ax = axes[r, c]
                part = by_key.get(key)
                steps: set[float] = set()
                for g in members.itertuples(index=False):
                    if part is None:
                        break
                    line = part[part["group"] == g.group].sort_values("step")
                    if line.empty:
                        continue
                    colour = colours.get(g.variant, "#777777")
                    x, m = line["step"].to_numpy(float), line["mean"].to_numpy(float)
                    sd = line["std"].to_numpy(float)
                    if len(x) == 1:  # one epoch: a line and a band would draw nothing
                        ax.errorbar(x, m, yerr=np.nan_to_num(sd), color=colour, marker="o", ms=5, capsize=3)
                    else:
                        ax.plot(x, m, color=colour, lw=1.8 if g.variant == baseline else 1.5)
                        if np.isfinite(sd).any():
                            ax.fill_between(x, m - sd, m + sd, color=colour, alpha=0.16, lw=0)
                    steps.update(x)
                if not steps:
                    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="#999999")
                elif len(steps) == 1:  # else matplotlib ticks a ±5 % range around the one epoch
                    (step,) = steps
                    ax.set_xlim(step - 1, step + 1)
                if r == 0:
                    ax.set_title(title, fontweight="bold")
                if r == len(points) - 1:
                    ax.set_xlabel("epoch")
                if c == 0 and point.grid_point:
                    ax.set_ylabel(safe_text(point.grid_point, 40), fontweight="bold")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        width, height = fig.get_figwidth(), fig.get_figheight()
        fig.legend(
            handles=_legend_handles(colours, baseline),
            loc="upper center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=min(len(colours), 6),
        )
        # fixed margins in inches (legend + titles on top, epoch label below, grid-point label left):
        # much faster than tight_layout + bbox_inches="tight" on 4 × n panels
        fig.subplots_adjust(
            left=0.75 / width, right=1 - 0.1 / width, top=1 - 0.62 / height, bottom=0.5 / height,
            wspace=0.22, hspace=0.18,
        )
        return fig_to_svg(fig, tight=False)


def accuracy_vs_cost(table: pd.DataFrame, colours: Mapping[str, str], baseline: str | None,
                     y_key: str = _FINAL_MAP, y_label: str = "final val mAP") -> str | None:
    """Headline metric against s/epoch per group (±1 std error bars); colour = variant, marker = grid point."""
    x_key = tracking_names.MEAN_EPOCH_TIME
    if table.empty or f"{x_key}_mean" not in table or f"{y_key}_mean" not in table:
        return None
    ok = table[np.isfinite(table[f"{x_key}_mean"].astype(float)) & np.isfinite(table[f"{y_key}_mean"].astype(float))]
    if ok.empty:
        return None
    with plt.rc_context(_RC):
        fig, axes = _new(1, 1, 6.4, 4.2)
        ax = axes[0, 0]
        points = list(dict.fromkeys(ok.sort_values("point_rank")["grid_point"]))
        marker = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(points)}
        if len(points) > 1:  # a faint line through each variant's grid points, in grid order
            for variant, part in ok.sort_values("point_rank").groupby("variant", sort=False):
                ax.plot(part[f"{x_key}_mean"], part[f"{y_key}_mean"], color=colours.get(variant, "#777777"),
                        lw=0.8, ls=":", alpha=0.7)
        # rows as dicts: metric keys hold "/", which itertuples cannot name
        for g, row in zip(ok.itertuples(index=False), ok.to_dict("records"), strict=True):
            ax.errorbar(
                row[f"{x_key}_mean"],
                row[f"{y_key}_mean"],
                xerr=_nan0(row[f"{x_key}_std"]),
                yerr=_nan0(row[f"{y_key}_std"]),
                fmt=marker[g.grid_point],
                color=colours.get(g.variant, "#777777"),
                ms=7,
                capsize=2,
                elinewidth=1,
            )
        ax.set_xlabel("seconds per epoch (mean over seeds)")
        ax.set_ylabel(safe_text(y_label))
        handles = _legend_handles(colours, baseline)
        if len(points) > 1 or points[0]:
            handles += [
                Line2D([], [], color="#555555", marker=marker[p], ls="", label=safe_text(p or "—", 40)) for p in points
            ]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5))
        ax.set_title("accuracy vs cost (up-left is better)", fontweight="bold")
        fig.tight_layout()
        return fig_to_svg(fig)


def _nan0(value: float) -> float:
    return 0.0 if value is None or not math.isfinite(float(value)) else float(value)


def scaling_curves(
    table: pd.DataFrame, colours: Mapping[str, str], baseline: str | None, axis: str = "data.train_size",
    y_key: str = _FINAL_MAP, y_label: str = "final val mAP",
) -> str | None:
    """Headline metric (±1 std) and Δ vs baseline (95% CI) against the training-set size, a line per variant."""
    col = f"grid.{axis}"
    if table.empty or col not in table:
        return None
    sizes = pd.to_numeric(table[col], errors="coerce")
    frame = table.assign(_x=sizes)[np.isfinite(sizes)]
    frame = frame[np.isfinite(frame[f"{y_key}_mean"].astype(float))]
    if frame["_x"].nunique() < 2:
        return None
    other = [c for c in table.columns if c.startswith("grid.") and c != col]
    with plt.rc_context(_RC):
        delta = f"delta_{y_key}"
        has_delta = delta in frame and np.isfinite(frame[delta].astype(float)).any()
        fig, axes = _new(1, 2 if has_delta else 1, 9.0 if has_delta else 5.0, 4.0)
        styles = itertools.cycle(["-", "--", ":", "-."])
        keyed = frame.groupby(["variant", *other], sort=False, dropna=False) if other else frame.groupby("variant")
        n_lines = keyed.ngroups
        for i, (key, part) in enumerate(keyed):
            variant = key[0] if isinstance(key, tuple) else key
            part = part.sort_values("_x")
            colour = colours.get(variant, "#777777")
            ls = next(styles) if other else "-"
            x = part["_x"].to_numpy(float)
            m = part[f"{y_key}_mean"].to_numpy(float)
            sd = part[f"{y_key}_std"].to_numpy(float)
            ax = axes[0, 0]
            ax.plot(x, m, color=colour, ls=ls, marker="o", ms=4)
            if np.isfinite(sd).any():
                ax.fill_between(x, m - np.nan_to_num(sd), m + np.nan_to_num(sd), color=colour, alpha=0.15, lw=0)
            if has_delta and variant != baseline:
                d = part[delta].to_numpy(float)
                lo = part[f"{delta}_low"].to_numpy(float)
                hi = part[f"{delta}_high"].to_numpy(float)
                err = np.vstack([np.nan_to_num(d - lo), np.nan_to_num(hi - d)])
                dodge = 1 + 0.02 * (i - (n_lines - 1) / 2)  # side by side, so the intervals do not hide each other
                axes[0, 1].errorbar(x * dodge, d, yerr=err, color=colour, ls=ls, marker="o", ms=4, capsize=3)
        for ax in axes[0]:
            ax.set_xlabel(safe_text(axis))
            if frame["_x"].max() / max(frame["_x"].min(), 1e-12) >= 8:
                ax.set_xscale("log")
        axes[0, 0].set_ylabel(safe_text(y_label))
        axes[0, 0].set_title("scaling with training-set size (±1 std)", fontweight="bold")
        if has_delta:
            axes[0, 1].axhline(0.0, color=BASELINE_COLOUR, lw=1, ls="--")
            axes[0, 1].set_ylabel(safe_text(f"Δ {y_label} vs {baseline}"))
            axes[0, 1].set_title("Δ vs baseline (95% CI)", fontweight="bold")
        axes[0, 0].legend(handles=_legend_handles(colours, baseline), loc="best", fontsize=8)
        fig.tight_layout()
        return fig_to_svg(fig)


def op_bars(
    summaries: Mapping[str, pd.DataFrame],
    shares: Mapping[str, tuple[float, float]],
    colours: Mapping[str, str],
    per_row: int = 3,
) -> str | None:
    """Top operators by self time per variant; deformable-sampling ops in orange, share in the title."""
    if not summaries:
        return None
    names = list(summaries)
    rows = math.ceil(len(names) / per_row)
    cols = min(per_row, len(names))
    with plt.rc_context(_RC):
        fig, axes = _new(rows, cols, 4.4 * cols, 2.9, sharex=True)
        for i, variant in enumerate(names):
            ax = axes[i // cols, i % cols]
            frame = summaries[variant].iloc[::-1]
            labels = [safe_text(n, 34) for n in frame["name"]]
            bar_colours = [DEFORM_COLOUR if d else OTHER_OP_COLOUR for d in frame["deform"]]
            ax.barh(range(len(frame)), frame["ms"], color=bar_colours)
            ax.set_yticks(range(len(frame)), labels, fontsize=7.5)
            ax.grid(axis="y", visible=False)
            unit = "CUDA" if frame.attrs.get("time_column") == "self_cuda_ms" else "CPU"
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(f"self {unit} ms per profiled run")
            share = shares.get(variant)
            subtitle = ""
            if share is not None and math.isfinite(share[0]):
                sd = f" ± {share[1]:.0%}" if math.isfinite(share[1]) and share[1] > 0 else ""
                subtitle = f"\nDCN sampling share {share[0]:.0%}{sd}"
            ax.set_title(safe_text(variant, 40) + subtitle, fontsize=9.5, color=colours.get(variant, "#333333"),
                         fontweight="bold")
        for j in range(len(names), rows * cols):
            axes[j // cols, j % cols].set_visible(False)
        fig.tight_layout()
        return fig_to_svg(fig)


def study_plots(trials: pd.DataFrame, studies: pd.DataFrame, colours: Mapping[str, str]) -> str | None:
    """Left: objective vs learning rate (log x), pruned trials hollow; right: optimisation history."""
    if trials.empty:
        return None
    fig, axes = _new(1, 2, 11.5, 3.6)
    left, right = axes[0]
    names = list(dict.fromkeys(trials["study"]))
    palette = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    metric = str(studies["metric"].iloc[0]) if not studies.empty else "objective"
    for study in names:
        part = trials[trials["study"] == study]
        variant = str(part["variant"].iloc[0]) if part["variant"].notna().any() else str(study)
        colour = colours.get(variant) or next(palette)
        label = safe_text(study)
        done = part[(part["state"] == "COMPLETE") & part["value"].notna()]
        pruned = part[(part["state"] == "PRUNED") & part["value"].notna()]
        left.scatter(done["lr"], done["value"], color=colour, s=28, label=label, zorder=3)
        left.scatter(pruned["lr"], pruned["value"], facecolors="none", edgecolors=colour, s=28, marker="o",
                     linewidths=1.2, zorder=3)
        ordered = part[part["value"].notna()].sort_values("number")
        right.scatter(ordered["number"], ordered["value"], color=colour, s=14, alpha=0.6)
        direction = studies.loc[studies["study"] == study, "direction"]
        maximize = direction.iloc[0] == "maximize" if len(direction) else True
        complete = ordered[ordered["state"] == "COMPLETE"]
        if not complete.empty:
            best = complete["value"].cummax() if maximize else complete["value"].cummin()
            right.step(complete["number"], best, where="post", color=colour, label=label)
    left.set_xscale("log")
    left.set_xlabel("learning rate (log)")
    left.set_ylabel(safe_text(metric))
    left.set_title("objective vs learning rate (hollow: pruned, at its best epoch)", fontsize=9)
    right.set_xlabel("trial number")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel(safe_text(metric))
    right.set_title("optimisation history (line: best so far)", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    return fig_to_svg(fig)


def _ci_err(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)])


def accuracy_vs_model(frame: pd.DataFrame, colours: Mapping[str, str], baseline: str | None, y_label: str
                      ) -> str | None:
    """Headline mean (95% CI bars) against FLOPs per image and against parameters, one point per group.

    `frame`: variant, grid_point, point_rank, mean, ci_low, ci_high, flops, params.
    """
    panels = [(k, label) for k, label in (("flops", "forward FLOPs per image"), ("params", "parameters"))
              if k in frame and np.isfinite(frame[k].astype(float)).any()]
    ok = frame[np.isfinite(frame["mean"].astype(float))] if not frame.empty else frame
    if ok.empty or not panels:
        return None
    with plt.rc_context(_RC):
        fig, axes = _new(1, len(panels), 5.2 * len(panels), 3.8, sharey=True)
        points = list(dict.fromkeys(ok.sort_values("point_rank")["grid_point"]))
        marker = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(points)}
        for ax, (key, label) in zip(axes[0], panels, strict=True):
            for g in ok.itertuples(index=False):
                x = float(getattr(g, key))
                if not math.isfinite(x):
                    continue
                err = _ci_err(np.array([g.mean]), np.array([g.ci_low]), np.array([g.ci_high]))
                ax.errorbar([x], [g.mean], yerr=err, fmt=marker[g.grid_point], color=colours.get(g.variant, "#777777"),
                            ms=7, capsize=3, elinewidth=1)
            ax.set_xlabel(label)
            ax.set_title(f"{safe_text(y_label)} vs {label}", fontweight="bold", fontsize=9)
        axes[0, 0].set_ylabel(safe_text(y_label))
        handles = _legend_handles(colours, baseline)
        if len(points) > 1 or points[0]:
            handles += [Line2D([], [], color="#555555", marker=marker[p], ls="", label=safe_text(p or "—", 40))
                        for p in points]
        axes[0, -1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        return fig_to_svg(fig)


def robustness_bands(curves: pd.DataFrame, colours: Mapping[str, str], baseline: str | None) -> str | None:
    """mAP against transform magnitude per family: mean over seeds with a 95% t band, a line per group.

    `curves`: group, variant, point_rank, seed, family, magnitude, value (one row per run and point).
    """
    if curves.empty:
        return None
    families = list(dict.fromkeys(curves["family"]))
    with plt.rc_context(_RC):
        fig, axes = _new(1, len(families), 3.2 * len(families), 3.2, sharey=True)
        styles = ["-", "--", ":", "-."]
        for ax, family in zip(axes[0], families, strict=True):
            part = curves[curves["family"] == family]
            for group, g in part.groupby("group", sort=False):
                stats = g.groupby("magnitude")["value"].agg(["mean", "std", "count"]).sort_index()
                x, m = stats.index.to_numpy(float), stats["mean"].to_numpy(float)
                n = stats["count"].to_numpy(float)
                half = np.where(n > 1, st.t.ppf(0.975, np.maximum(n - 1, 1)) * stats["std"].to_numpy(float)
                                / np.sqrt(n), np.nan)
                variant = str(g["variant"].iloc[0])
                colour = colours.get(variant, "#777777")
                ls = styles[int(g["point_rank"].iloc[0]) % len(styles)]
                ax.plot(x, m, color=colour, ls=ls, marker="o", ms=3, label=safe_text(str(group), 40))
                if np.isfinite(half).any():
                    ax.fill_between(x, m - np.nan_to_num(half), m + np.nan_to_num(half), color=colour, alpha=0.15,
                                    lw=0)
            ax.set_title(safe_text(family), fontweight="bold")
            ax.set_xlabel("magnitude")
        axes[0, 0].set_ylabel("mAP under the transform")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        return fig_to_svg(fig)
