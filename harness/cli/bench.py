"""`harness bench ops|model|overhead|data`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from harness.bench import (
    CUDA_BLOCK_CALLS,
    CUDA_ROUNDS,
    DEFAULT_SHAPES,
    IMPLS,
    MODEL_WIDTH,
    LayerShape,
    bench_model,
    bench_ops,
    bench_overhead,
    machine_description,
)
from harness.cli.app import bench_app, console
from harness.data.scale import DEFAULT_SIZES, TRAIN2017_IMAGES, bench_data, figures_json
from harness.errors import HarnessError
from harness.models import MODELS


@bench_app.command("ops")
def ops(
    shape: Annotated[
        list[str] | None,
        typer.Option("--shape", help="N,C,O,H[,stride[,dilation]]; repeat for several (default: the standard set)"),
    ] = None,
    impl: Annotated[list[str] | None, typer.Option("--impl", help=f"subset of {', '.join(IMPLS)}")] = None,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 2,
    reps: Annotated[int, typer.Option(help="timed repetitions (median reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed warm-up calls")] = 2,
    memory: Annotated[bool, typer.Option("--memory", help="also measure peak RSS per case (subprocess each)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    amp: Annotated[str, typer.Option(help="none, bf16 or fp16: forward under autocast")] = "none",
) -> None:
    """Forward+backward time of conv2d vs our DCN (per_tap, shared, modulated) vs torchvision's DCN.

    im2col_gemm times only the per-tap layer's three matmuls on ready-made columns: the floor of any
    sample-then-matmul implementation on this machine's BLAS.
    """
    shapes = [LayerShape.parse(s) for s in shape] if shape else [LayerShape(*s) for s in DEFAULT_SHAPES]
    impls = tuple(impl) if impl else IMPLS
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise HarnessError(f"unknown --impl {unknown}; known: {', '.join(IMPLS)}")
    with console.status("benchmarking") as status:
        rows = bench_ops(shapes, impls, warmup, reps, threads, memory, progress=status.update, device=device, amp=amp)
    if as_json:
        print(json.dumps({"machine": machine_description(), "rows": [asdict(r) for r in rows]}, indent=2))
        return
    precision = "fp32" if amp == "none" else f"autocast {amp}"
    if device == "cuda":
        timing = f"median of {max(reps, CUDA_ROUNDS)} rounds of {CUDA_BLOCK_CALLS} calls, cases in turns"
    else:
        timing = f"median of {reps}"
    table = Table(title=f"forward+backward, {precision}, {device}, {threads} threads ({timing})")
    table.add_column("shape N×C→O @H")
    for name in impls:
        table.add_column(name, justify="right")
    if "torchvision" in impls and "per_tap" in impls:
        table.add_column("per_tap vs tv", justify="right")
    by_shape: dict[str, dict[str, object]] = {}
    for row in rows:
        by_shape.setdefault(row.shape, {})[row.impl] = row
    for label, cells in by_shape.items():
        values = []
        for name in impls:
            r = cells[name]
            text = f"{r.ms:.2f} ms" if name == "conv2d" else f"{r.ms:.2f} ms ({r.ratio_to_conv2d:.1f}×)"
            if r.peak_mb is not None:
                text += f" {r.peak_mb:.0f} MiB"
            values.append(text)
        if "torchvision" in impls and "per_tap" in impls:
            values.append(f"{cells['torchvision'].ms / cells['per_tap'].ms:.1f}× faster")
        table.add_row(label, *values)
    console.print(table)
    console.print(f"machine: {machine_description()}")


@bench_app.command("model")
def model(
    placement: Annotated[
        list[str] | None, typer.Option("--placement", help="deform_layers spec; repeat (default: none, first:2, all)")
    ] = None,
    image_size: Annotated[int, typer.Option(help="square input size in px")] = 64,
    batch: Annotated[int, typer.Option(help="batch size")] = 32,
    arch: Annotated[str, typer.Option(help="unet_encoder, small3, resnet18|34|50 or package.module:factory")] = (
        "unet_encoder"),
    width: Annotated[
        float | None, typer.Option(help=f"width multiplier of unet_encoder and small3 (default {MODEL_WIDTH})")
    ] = None,
    offset_channels: Annotated[str, typer.Option(help="per_tap or shared")] = "per_tap",
    modulated: Annotated[bool, typer.Option("--modulated", help="DCNv2 masks")] = False,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 2,
    reps: Annotated[int, typer.Option(help="timed steps per placement, at least (median reported)")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    amp: Annotated[str, typer.Option(help="none, bf16 or fp16")] = "none",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="NHWC activations and weights")] = False,
) -> None:
    """Training-step images/s of the network for each deformable placement (steps interleaved across
    placements, so that a machine whose speed drifts slows them alike)."""
    placements = placement or ["none", "first:2", "all"]
    with console.status("benchmarking") as status:
        rows = bench_model(
            placements, image_size, batch, arch, width, offset_channels, modulated,
            reps=reps, threads=threads, progress=status.update, device=device, amp=amp, channels_last=channels_last,
        )
    if as_json:
        print(json.dumps({"machine": machine_description(), "rows": [asdict(r) for r in rows]}, indent=2))
        return
    scale = "" if arch not in MODELS else f" ×{MODEL_WIDTH if width is None else width}"
    table = Table(title=f"{arch}{scale} training step, {image_size} px, batch {batch}, {offset_channels}")
    for col in ("placement", "images/s", "ms/step", "vs standard", "steps"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.placement, f"{r.images_per_s:.1f}", f"{r.ms_per_step:.1f}", f"{r.relative_to_standard:.2f}×",
                      str(r.steps))
    console.print(table)
    console.print(f"machine: {machine_description()}")


@bench_app.command("overhead")
def overhead(
    data_root: Annotated[str, typer.Option("--data-root", help="COCO root, e.g. ../shared/coco-mini")],
    epochs: Annotated[int, typer.Option(help="epochs per measurement")] = 10,
    image_size: Annotated[int, typer.Option(help="square input size in px")] = 64,
    placement: Annotated[str, typer.Option(help="deform_layers spec")] = "first:2",
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """What MLflow logging, checkpoints and the profiler window add to an epoch's wall-clock."""
    with console.status("measuring"):
        rows = bench_overhead(data_root, epochs, image_size, placement, threads)
    if as_json:
        print(json.dumps({"machine": machine_description(), "rows": [asdict(r) for r in rows]}, indent=2))
        return
    table = Table(title=f"wall-clock per epoch, {image_size} px, deform_layers={placement}, {epochs} epochs")
    for col in ("setting", "s/epoch", "overhead"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.setting, f"{r.seconds_per_epoch:.2f}", f"{100 * r.overhead:+.1f}%")
    console.print(table)


@bench_app.command("data")
def data(
    images: Annotated[int, typer.Option("--images", help="JPEGs to generate in COCO layout")] = 20_000,
    size: Annotated[list[int] | None, typer.Option("--size", help="cache image size; repeat (default 64, 128, 224)")]
    = None,
    source: Annotated[str, typer.Option("--source-size", help="generated JPEGs' WIDTHxHEIGHT (COCO: ~640x480)")]
    = "640x480",
    workers: Annotated[int | None, typer.Option(help="decoding threads (default: CPU count, at most 16)")] = None,
    work: Annotated[Path | None, typer.Option("--work", help="keep the generated data here (default: a temp dir)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Build the decode-once cache from generated COCO-layout JPEGs: images/s, peak memory, disk, and the
    projection to train2017 (docs/scaling.md)."""
    try:
        width, height = (int(v) for v in source.lower().split("x"))
    except ValueError:
        raise HarnessError(f"--source-size {source!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    with console.status("benchmarking") as status:
        rows = bench_data(images, size or DEFAULT_SIZES, width, height, workers, work, progress=status.update)
    if as_json:
        print(json.dumps({"machine": machine_description(), "rows": json.loads(figures_json(rows))}, indent=2))
        return
    table = Table(title=f"cache build, {images} JPEGs {width}×{height} → squash, {workers or 'default'} threads")
    for col in ("size", "images/s", "build s", "RSS before → peak", "entry", "reload s",
                f"train2017 ({TRAIN2017_IMAGES:,})"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r.size} px", f"{r.images_per_s:,.0f}", f"{r.seconds:.1f}",
                      f"{r.rss_before_mb:,.0f} → {r.build_peak_rss_mb:,.0f} MiB", f"{r.entry_bytes / 2**20:,.0f} MiB",
                      f"{r.reload_s:.3f}",
                      f"{r.train2017_minutes:.1f} min, {r.train2017_gb:.1f} GB")
    console.print(table)
    console.print(f"machine: {machine_description()}")
