"""The report's "why deformable convolution helps" section: one self-contained HTML fragment from MLflow.

    from harness.analysis.section import analysis_section
    html = analysis_section(data.runs, store)          # data.runs: the report's run table, or
    html = analysis_section(query.search_runs(store, [experiment_id]), "sqlite:///results/mlflow.db")

Only the `run_id` column of `runs_df` is used (plus `status`/`state` to keep finished runs); every number,
label and figure is read from the MLflow store: the metrics robust/*, offset/*, erf/*, the params
model.deform_layers / model.offset_channels, the tags harness.group / harness.variant / harness.seed /
harness.baseline, and the artifacts analysis/offset_hist.csv, analysis/sampling.png, analysis/erf.npy.
Plots are inline SVG (matplotlib), the sampling figures PNG data URIs (the report's CSP allows
`img-src data:`); the template has autoescape on, and user strings reach matplotlib only through
`harness.figures.safe_text`. Runs without analysis are left out; when none has any, the section says how to make it.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from harness.analysis import plots, reader
from harness.analysis.robustness import IDENTITY, UNITS
from harness.figures import fig_to_svg, safe_text
from harness.tracking import names, query

BASELINE_COLOUR = "#3d3d3d"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
FAMILY_ORDER = ("rotation", "scale", "stretch", "shear")
REGION_ORDER = ("small", "medium", "large", "background")

LAYOUT_TEXT = [
    "With one offset shared by all k×k taps (the 2-channel layout), every tap of an output pixel moves "
    "by the same Δp(p). Then y(p) = Σ_k w_k · x(p + p_k + Δp(p)) = z(p + Δp(p)), where z = w ⋆ x is the ordinary "
    "convolution of the zero-padded input evaluated at a real-valued position by bilinear interpolation — which "
    "is linear, so it commutes with the weighted sum. The layer is exactly an ordinary convolution followed by "
    "a learned per-pixel bilinear warp of its output: it can move the receptive field, but not rescale, "
    "stretch, shear or rotate it. Its effective dilation is exactly the conv's dilation and its tap spread is 0.",
    "The per-tap layout (2·k·k channels) gives each tap its own Δp_k(p): the k×k grid can be dilated "
    "(Δp_k = (s − 1)·p_k gives an s-times dilated kernel), stretched, sheared or rotated (Δp_k = (R − I)·p_k), "
    "per output pixel. Its effective dilation and tap spread below measure how much it uses that freedom.",
    "Both statements are checked numerically in tests/analysis/test_layouts.py (equality to 1e-6 in float64 "
    "for random offsets; a per-tap layer reproducing a dilated and a rotated convolution exactly).",
]

_TEMPLATE = """\
<section class="dcn-analysis" id="dcn-analysis">
<style>
.dcn-analysis table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 0.85em; }
.dcn-analysis th, .dcn-analysis td { border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
.dcn-analysis th:first-child, .dcn-analysis td:first-child { text-align: left; }
.dcn-analysis .sd { color: #777; font-size: 0.85em; }
.dcn-analysis figure { margin: 0.5em 0 1.2em; }
.dcn-analysis figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.dcn-analysis figcaption, .dcn-analysis .note { color: #555; font-size: 0.85em; }
.dcn-analysis svg { max-width: 100%; height: auto; }
</style>
<h{{ h }}>Why deformable convolution helps</h{{ h }}>
{% if not runs %}
<p class="note">No analysis is logged for these runs yet. Run <code>harness eval {{ ablation }}</code>
(robustness, offset statistics, sampling locations, effective receptive fields), then rebuild the report.</p>
{% else %}
<p class="note">From <code>harness eval</code> on {{ runs|length }} finished run(s) in {{ groups|length }} group(s);
mean over seeds, ± one standard deviation (n−1) where a group has several. Definitions: docs/analysis.md.</p>

{% if robust_svg %}
<h{{ h + 1 }}>Robustness to geometric transforms</h{{ h + 1 }}>
<p class="note">Val mAP with the val images rotated, scaled, stretched (aspect ratio, area kept) and sheared,
applied to the normalised images (bilinear, mean-grey padding); the identity of each family is the plain val set.
Bottom row: change relative to the untransformed images.</p>
<figure>{{ robust_svg }}</figure>
<table>
<thead><tr><th>group</th><th>val mAP</th>{% for f in families %}<th>{{ f }}<br>mAP drop</th>{% endfor %}
{% for f in families %}<th>{{ f }}<br>F1 drop</th>{% endfor %}</tr></thead>
<tbody>
{% for row in robust_rows %}<tr><td>{{ row.group }}</td><td>{{ row.map }}</td>
{% for cell in row.map_drops %}<td>{{ cell }}</td>{% endfor %}
{% for cell in row.f1_drops %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
<p class="note">Drop = 1 − metric(transformed) / metric(untransformed), averaged over the family's non-identity
magnitudes ({{ magnitudes_text }}); negative: better than on the untransformed images. F1 is micro-F1 at
threshold 0.5.</p>
{% endif %}

<h{{ h + 1 }}>What each offset layout can express</h{{ h + 1 }}>
{% for para in layout_text %}<p>{{ para }}</p>
{% endfor %}

{% if offset_rows %}
<h{{ h + 1 }}>Offset statistics per deformable layer</h{{ h + 1 }}>
<table>
<thead><tr><th>group</th><th>layer</th><th>layout</th><th>mean |Δp|</th><th>eff. dilation</th><th>tap spread</th>
{% for r in regions %}<th>|Δp| {{ r }}</th>{% endfor %}<th>positions (%)<br>{{ regions|join(" / ") }}</th></tr></thead>
<tbody>
{% for row in offset_rows %}<tr><td>{{ row.group }}</td><td>{{ row.layer }}</td><td>{{ row.layout }}</td>
<td>{{ row.mean_abs }}</td><td>{{ row.eff_dilation }}</td><td>{{ row.tap_spread }}</td>
{% for cell in row.regions %}<td>{{ cell }}</td>{% endfor %}<td>{{ row.shares }}</td></tr>
{% endfor %}</tbody></table>
<p class="note">Pixels of the layer's own input plane. Effective dilation: mean distance between the sampling
points of adjacent taps (DCNv1); the conv's own dilation is 1. Tap spread: mean distance of a tap's offset from
the mean offset of its k×k taps (0 = the kernel only moves). Regions: the smallest COCO box containing the
output position; small / medium / large by box area under 32²/(640·480) / above 96²/(640·480) of the image.</p>
{% if hist_svg %}<figure>{{ hist_svg }}
<figcaption>Distribution of |Δp| (share of taps, summed over seeds).</figcaption></figure>{% endif %}
{% endif %}

{% if sampling %}
<h{{ h + 1 }}>Sampling locations</h{{ h + 1 }}>
<p class="note">For an output unit on an object and one on background: the points the stacked layers read in the
input image, composed through consecutive deformable layers (k² points of the upper layer, each spreading into
the k² points of the layer below: 81 for two 3×3 layers), beside the fixed grid the same layers sample without
offsets.</p>
{% for s in sampling %}<figure><img src="{{ s.src }}" alt="sampling locations of {{ s.name }}">
<figcaption>{{ s.group }} — run {{ s.name }}</figcaption></figure>
{% endfor %}
{% endif %}

{% if erf_svg %}
<h{{ h + 1 }}>Effective receptive fields</h{{ h + 1 }}>
<p class="note">|∂y/∂x| of the centre unit of the last conv layer with respect to the input image, averaged over
val images, channels and seeds (each map normalised to its maximum).</p>
<figure>{{ erf_svg }}</figure>
<table><thead><tr><th>group</th><th>RMS radius (px)</th><th>area holding 50%</th><th>area holding 90%</th></tr></thead>
<tbody>{% for row in erf_rows %}<tr><td>{{ row.group }}</td><td>{{ row.rms }}</td>
<td>{{ row.a50 }}</td><td>{{ row.a90 }}</td></tr>
{% endfor %}</tbody></table>
{% endif %}
{% endif %}
</section>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _run_ids(runs_df: pd.DataFrame) -> list[str]:
    if runs_df is None or len(runs_df) == 0 or "run_id" not in runs_df.columns:
        return []
    frame = runs_df
    if "state" in frame.columns:
        frame = frame[frame["state"] == "finished"]
    elif "status" in frame.columns:
        frame = frame[frame["status"] == "FINISHED"]
    return [str(r) for r in frame["run_id"]]


def _group_order(runs: Sequence[reader.AnalysedRun], baseline: str | None) -> list[str]:
    """Baseline group(s) first, then the others in the order they were first trained (the ablation file's)."""
    first: dict[str, int] = {}
    for r in runs:
        first[r.group] = min(first.get(r.group, r.start_time), r.start_time)
    groups = sorted(first, key=lambda g: (first[g], g))
    base = [g for g in groups if any(r.group == g and (r.variant == baseline if baseline else r.baseline)
                                     for r in runs)]
    return base + [g for g in groups if g not in base]


def _colours(groups: Sequence[str], baseline_groups: set[str]) -> dict[str, str]:
    out, palette = {}, itertools.cycle(PALETTE)
    for g in groups:
        out[g] = BASELINE_COLOUR if g in baseline_groups else next(palette)
    return out


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if reader.finite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def _cell(values: Sequence[float], fmt: str = ".3f", percent: bool = False) -> Markup | str:
    """mean ± sd (sd only with two or more values) as escaped HTML; "—" without a finite value."""
    mean, sd = _mean_sd(values)
    if not np.isfinite(mean):
        return "—"
    scale, suffix, fmt = (100.0, "%", ".1f") if percent else (1.0, "", fmt)
    text = Markup("{}").format(f"{mean * scale:{fmt}}{suffix}")
    if np.isfinite(sd):
        text += Markup(' <span class="sd">± {}</span>').format(f"{sd * scale:{fmt}}")
    return text


# ------------------------------------------------------------------------------------------- robustness


def _robust_tables(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run, family, magnitude, metric: value and rel (value / identity value − 1)."""
    frame = frame.copy()
    ident = frame[[IDENTITY.get(f, np.nan) == m for f, m in zip(frame["family"], frame["magnitude"], strict=True)]]
    ref = ident.set_index(["run_id", "family", "metric"])["value"]
    keys = list(zip(frame["run_id"], frame["family"], frame["metric"], strict=True))
    refs = [ref.get(k, np.nan) for k in keys]
    frame["rel"] = [v / r - 1.0 if reader.finite(r) and r > 0 else np.nan for v, r in zip(frame["value"], refs,
                                                                                          strict=True)]
    return frame


def _robust_figure(frame: pd.DataFrame, groups: Sequence[str], colours: dict[str, str]) -> str:
    import matplotlib.pyplot as plt

    families = [f for f in FAMILY_ORDER if f in set(frame["family"])]
    data = frame[frame["metric"] == "map"]
    with plt.rc_context({**plots.RC, "axes.grid": True, "grid.alpha": 0.3}):
        fig, axes = plt.subplots(2, len(families), figsize=(2.7 * len(families), 4.6), squeeze=False)
        for j, family in enumerate(families):
            part = data[data["family"] == family]
            for group in groups:
                g = part[part["group"] == group]
                if g.empty:
                    continue
                for row, column in ((0, "value"), (1, "rel")):
                    stats = g.groupby("magnitude")[column].agg(["mean", "std", "count"]).sort_index()
                    x = stats.index.to_numpy(dtype=float)
                    y = stats["mean"].to_numpy() * (100.0 if row else 1.0)
                    ax = axes[row, j]
                    ax.plot(x, y, marker="o", markersize=3, color=colours[group], label=safe_text(group, 40))
                    sd = stats["std"].to_numpy() * (100.0 if row else 1.0)
                    if (stats["count"] > 1).any():
                        ax.fill_between(x, y - np.nan_to_num(sd), y + np.nan_to_num(sd), color=colours[group],
                                        alpha=0.15, linewidth=0)
            axes[0, j].set_title(f"{family}")
            axes[1, j].set_xlabel(f"{family} ({UNITS.get(family, '')})")
            axes[1, j].axhline(0, color="#999", linewidth=0.8)
        axes[0, 0].set_ylabel("val mAP")
        axes[1, 0].set_ylabel("Δ mAP vs untransformed (%)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        return fig_to_svg(fig)


def _robust_rows(frame: pd.DataFrame, groups: Sequence[str], families: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    moved = frame[[IDENTITY.get(f, np.nan) != m for f, m in zip(frame["family"], frame["magnitude"], strict=True)]]
    ident = frame[[IDENTITY.get(f, np.nan) == m for f, m in zip(frame["family"], frame["magnitude"], strict=True)]]
    for group in groups:
        g_ident = ident[(ident["group"] == group) & (ident["metric"] == "map")]
        per_run_map = g_ident.groupby("run_id")["value"].first().tolist()
        map_drops, f1_drops = [], []
        for family in families:
            for metric, out in (("map", map_drops), ("micro_f1", f1_drops)):
                part = moved[(moved["group"] == group) & (moved["family"] == family) & (moved["metric"] == metric)]
                per_run = (-part.groupby("run_id")["rel"].mean()).tolist()
                out.append(_cell(per_run, percent=True))
        rows.append({"group": group, "map": _cell(per_run_map), "map_drops": map_drops, "f1_drops": f1_drops})
    return rows


# ------------------------------------------------------------------------------------------ offsets


def _offset_rows(frame: pd.DataFrame, runs: Sequence[reader.AnalysedRun], groups: Sequence[str]) -> list[dict]:
    layouts = {r.group: r.params.get("model.offset_channels", "") for r in runs}
    rows = []
    for group in groups:
        g = frame[frame["group"] == group]
        for layer in sorted(set(g["layer"])):
            part = g[g["layer"] == layer]

            def values(stat: str, region: str = "all", part: pd.DataFrame = part) -> list[float]:
                return part[(part["stat"] == stat) & (part["region"] == region)]["value"].tolist()

            rows.append({
                "group": group, "layer": f"conv{layer}",
                "layout": {"per_tap": "per-tap (2·k·k)", "shared": "shared (2)"}.get(layouts.get(group, ""), "?"),
                "mean_abs": _cell(values("mean_abs")), "eff_dilation": _cell(values("eff_dilation")),
                "tap_spread": _cell(values("tap_spread")),
                "regions": [_cell(values("mean_abs", r)) for r in REGION_ORDER],
                "shares": " / ".join(_share(values("share", r)) for r in REGION_ORDER),
            })
    return rows


def _share(values: list[float]) -> str:
    mean, _ = _mean_sd(values)
    if not np.isfinite(mean):
        return "—"
    return f"{mean * 100:.1f}" if 0 < mean < 0.1 else f"{mean * 100:.0f}"


def _hist_figure(store: query.Store, runs: Sequence[reader.AnalysedRun], groups: Sequence[str]) -> str:
    import matplotlib.pyplot as plt

    per_group: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        table = reader.artifact_csv(store, run, names.analysis_artifact(names.ANALYSIS_OFFSET_HIST))
        if table is None or not {"layer", "bin_lo", "count"} <= set(table.columns):
            continue
        for layer, part in table.groupby("layer"):
            lo = part["bin_lo"].to_numpy(dtype=float)
            counts = part["count"].to_numpy(dtype=float)
            old = per_group.setdefault(run.group, {}).get(int(layer))
            if old is not None and len(old[1]) == len(counts):
                counts = counts + old[1]
            per_group[run.group][int(layer)] = (lo, counts)
    shown = [g for g in groups if g in per_group]
    if not shown:
        return ""
    with plt.rc_context(plots.RC):
        fig, axes = plt.subplots(1, len(shown), figsize=(3.3 * len(shown), 2.6), squeeze=False, sharey=True)
        for ax, group in zip(axes[0], shown, strict=True):
            right = 0.5
            for layer, (lo, counts) in sorted(per_group[group].items()):
                if counts.sum() <= 0:
                    continue
                width = float(np.diff(lo).min()) if len(lo) > 1 else 1.0
                edges = np.append(lo, lo[-1] + width)
                ax.stairs(counts / counts.sum(), edges, label=f"conv{layer}", linewidth=1.2)
                right = max(right, float(edges[np.flatnonzero(counts)[-1] + 1]))
            ax.set_xlim(0, right * 1.05)
            ax.set_title(safe_text(group, 45))
            ax.set_xlabel("|Δp| (layer-input px)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0, 0].set_ylabel("share of taps")
        fig.tight_layout()
        return fig_to_svg(fig)


# ---------------------------------------------------------------------------------------------- ERF


def _erf_section(store: query.Store, runs: Sequence[reader.AnalysedRun], groups: Sequence[str]
                 ) -> tuple[str, list[dict[str, Any]]]:
    maps: dict[str, list[np.ndarray]] = {}
    for run in runs:
        array = reader.artifact_npy(store, run, names.analysis_artifact(names.ANALYSIS_ERF_MAP))
        if array is not None:
            maps.setdefault(run.group, []).append(array.astype(np.float64))
    frame = reader.erf_frame(runs)
    rows = []
    for group in groups:
        g = frame[frame["group"] == group]
        if g.empty:
            continue
        rows.append({
            "group": group,
            "rms": _cell(g[g["stat"] == "rms_radius_px"]["value"].tolist(), ".1f"),
            "a50": _cell(g[g["stat"] == "area50_frac"]["value"].tolist(), percent=True),
            "a90": _cell(g[g["stat"] == "area90_frac"]["value"].tolist(), percent=True),
        })
    shown = [g for g in groups if g in maps and len({m.shape for m in maps[g]}) == 1]
    if not shown:
        return "", rows
    mean_maps = [np.mean(maps[g], axis=0) for g in shown]
    centres = [((m.shape[0] - 1) / 2, (m.shape[1] - 1) / 2) for m in mean_maps]
    titles = [f"{g} (n={len(maps[g])})" for g in shown]
    fig = plots.erf_figure(mean_maps, titles, centres)
    return fig_to_svg(fig), rows


# ------------------------------------------------------------------------------------------ section


def analysis_section(
    runs_df: pd.DataFrame,
    store: query.Store | str | None = None,
    *,
    baseline: str | None = None,
    heading_level: int = 2,
    max_sampling_figures: int = 6,
    ablation: str = "ABLATION",
) -> str:
    """The HTML fragment (a <section>) on robustness, offsets, sampling locations and ERFs of `runs_df`'s runs.

    `runs_df`: any table with a `run_id` column (the report's run table or `query.search_runs` output);
    with a `state` or `status` column only finished runs are kept. `store`: an opened `query.Store`, a
    tracking URI, or None for the default store. `baseline`: the variant drawn first in dark grey
    (default: runs tagged harness.baseline=true). `ablation` only fills the hint shown when no run has
    analysis yet. Reads MLflow only; returns a string ready to splice into a page.
    """
    opened = reader.open_reader(store)
    loaded = reader.load_runs(opened, _run_ids(runs_df))
    runs = [r for r in loaded if r.analysed or any(k.startswith(names.ANALYSIS_METRIC_PREFIXES) for k in r.metrics)]
    groups = _group_order(runs, baseline)
    base_groups = {r.group for r in runs if (r.variant == baseline if baseline else r.baseline)}
    colours = _colours(groups, base_groups)
    h = max(1, min(int(heading_level), 5))
    context: dict[str, Any] = {
        "h": h, "runs": runs, "groups": groups, "ablation": ablation, "layout_text": LAYOUT_TEXT,
        "robust_svg": "", "robust_rows": [], "families": [], "magnitudes_text": "",
        "offset_rows": [], "regions": REGION_ORDER, "hist_svg": "", "sampling": [], "erf_svg": "", "erf_rows": [],
    }
    if runs:
        robust = reader.robustness_frame(runs)
        if not robust.empty:
            robust = _robust_tables(robust)
            families = [f for f in FAMILY_ORDER if f in set(robust["family"])]
            context["families"] = families
            context["robust_svg"] = Markup(_robust_figure(robust, groups, colours))
            context["robust_rows"] = _robust_rows(robust, groups, families)
            context["magnitudes_text"] = "; ".join(
                f"{f}: " + ", ".join(f"{m:g}" for m in sorted(set(robust[robust["family"] == f]["magnitude"])))
                + f" {UNITS.get(f, '')}" for f in families
            )
        offsets = reader.offset_frame(runs)
        if not offsets.empty:
            context["offset_rows"] = _offset_rows(offsets, runs, groups)
            context["hist_svg"] = Markup(_hist_figure(opened, runs, groups))
        sampling = []
        for group in groups:
            members = sorted((r for r in runs if r.group == group), key=lambda r: (r.seed, r.name))
            for run in members:
                png = reader.artifact_bytes(opened, run, names.analysis_artifact(names.ANALYSIS_SAMPLING_PLOT))
                if png is not None and png.startswith(b"\x89PNG"):
                    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                    sampling.append({"src": src, "group": group, "name": run.name})
                    break
            if len(sampling) >= max_sampling_figures:
                break
        context["sampling"] = sampling
        erf_svg, erf_rows = _erf_section(opened, runs, groups)
        context["erf_svg"] = Markup(erf_svg)
        context["erf_rows"] = erf_rows
    return _ENV.from_string(_TEMPLATE).render(**context)
