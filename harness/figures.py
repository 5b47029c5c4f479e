"""Matplotlib (Agg backend) figures rendered for HTML and MLflow: SVG strings and PNG bytes, and the one
rule for user text in a figure. Shared by the report and the analysis."""

from __future__ import annotations

import io
import itertools
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

_ID = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')
_counter = itertools.count()


def safe_text(value: object, limit: int = 60) -> str:
    """A user string made safe for matplotlib text: no mathtext, bounded length."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def fig_to_svg(fig: plt.Figure, prefix: str | None = None, tight: bool = True) -> str:
    """Render `fig` to an SVG element string (no XML prolog, no global <style>, ids prefixed so that
    several figures can live in one HTML page)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight" if tight else None, metadata={"Date": None, "Creator": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<style[^>]*>.*?</style>", "", svg, flags=re.DOTALL)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
    prefix = prefix or f"f{next(_counter)}"
    return _ID.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", svg)


def fig_to_png(fig: plt.Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
