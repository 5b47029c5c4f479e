"""Report figures drawn from small hand-made frames (the report's end-to-end tests use real runs)."""

from __future__ import annotations

import re

import pandas as pd

from harness.report import plots


def _curves(epochs: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    key = plots.CURVE_PANELS[0][0]
    curves = pd.DataFrame([{"key": key, "group": group, "step": e, "mean": 0.5 + 0.1 * i - 0.01 * e, "std": 0.02}
                           for i, group in enumerate(("a", "b")) for e in epochs])
    groups = pd.DataFrame({"group": ["a", "b"], "variant": ["a", "b"], "point_rank": [0, 0], "grid_point": ["", ""]})
    return curves, groups


def _tick_labels(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_one_epoch_curves_show_a_point_per_group_and_an_integer_tick():
    """With one epoch (a quick run) a line and a band draw nothing; the report must still show the values."""
    curves, groups = _curves([1])
    svg = plots.learning_curves(curves, groups, {"a": "#111111", "b": "#222222"}, "a")
    assert svg is not None
    assert len(re.findall(r"<use xlink:href=\"#[^\"]+\"[^>]*style=\"fill: #(111111|222222)", svg)) >= 2
    labels = _tick_labels(svg)
    assert "1" in labels and not any(re.fullmatch(r"0\.9\d+|1\.0\d+", label) for label in labels)


def test_several_epochs_draw_lines():
    curves, groups = _curves([1, 2, 3])
    svg = plots.learning_curves(curves, groups, {"a": "#111111", "b": "#222222"}, "a")
    assert svg is not None and "stroke: #111111" in svg and "stroke: #222222" in svg
