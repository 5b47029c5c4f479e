"""`harness --version`: what a bug report needs in one glance (harness, torch, CUDA, which DCN kernel runs)."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import torch
import typer

from harness import __version__
from harness.cli.app import app, console
from harness.kernels import cpp_autograd, native


def version_lines() -> list[str]:
    """harness and torch versions, CUDA, and the deformable-convolution kernels' status on this machine."""
    try:
        vision = f", torchvision {metadata.version('torchvision')}"
    except metadata.PackageNotFoundError:
        vision = ""
    if torch.cuda.is_available():
        cuda = f"available (CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)})"
    else:
        cuda = f"not available (torch built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for CPU'})"
    lines = [f"harness {__version__}", f"torch {torch.__version__}{vision}", f"CUDA: {cuda}",
             f"DCN kernel (CPU): {native.status()}"]
    if torch.cuda.is_available():
        lines.append(f"DCN kernel (CUDA): {cpp_autograd.status()}")
    return lines


def show_version(value: bool) -> None:
    if value:
        for line in version_lines():
            console.print(line, highlight=False, soft_wrap=True)
        raise typer.Exit(0)


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", help="print versions, CUDA and DCN kernel status, and exit",
                           callback=show_version, is_eager=True)
    ] = False,
) -> None:
    """Benchmark and ablation harness for deformable convolution."""
