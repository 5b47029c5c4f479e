"""`harness data info|synth|download|prepare`: thin wrappers over `harness.data`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from harness.cli.app import console, data_app, err_console
from harness.data import RESIZE_MODES, download_coco, load_split, prepare_data, split_summary, synthesize
from harness.data.download import COCO_BASE_URL
from harness.errors import HarnessError


@contextmanager
def rich_progress(transfer: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """A `progress(description, done, total)` callback that drives a rich progress bar (one task per description).

    The runner can use it too: `with rich_progress() as cb: prepare_data(..., progress=cb)`.
    """
    count = DownloadColumn() if transfer else MofNCompleteColumn()
    columns = (TextColumn("{task.description}"), BarColumn(), count, TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total or None)
            bar.update(tasks[description], completed=done, total=total or None)

        yield update


def _report_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


@data_app.command("info")
def info(
    root: Annotated[Path, typer.Argument(help="COCO root (annotations/instances_<split>.json and <split>/)")],
    split: Annotated[str, typer.Option("--split", help="split name")] = "val2017",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Images, annotations, images without annotations and per-category image counts of a split."""
    summary = split_summary(load_split(root, split, check_image_dir=False))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(
        f"[bold]{summary['split']}[/] ({summary['annotation_file']}): {summary['images']} images, "
        f"{summary['annotations']} annotations ({summary['crowd_annotations']} crowd), "
        f"{summary['images_without_annotations']} images without annotations, {summary['num_classes']} categories",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(title=f"{summary['split']}: images per category")
    for name, justify in (("index", "right"), ("id", "right"), ("name", "left"), ("images", "right"),
                          ("annotations", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in summary["categories"]:
        table.add_row(str(c["index"]), str(c["id"]), c["name"], str(c["images"]), str(c["annotations"]))
    console.print(table)


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="output directory (COCO layout is written inside)")],
    n_train: Annotated[int, typer.Option("--n-train", help="training images")] = 2000,
    n_val: Annotated[int, typer.Option("--n-val", help="validation images")] = 500,
    size: Annotated[int, typer.Option("--size", help="image side in px")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="random seed (same seed, same dataset)")] = 0,
    num_classes: Annotated[int, typer.Option("--classes", help="number of shape classes (1..8)")] = 8,
    max_objects: Annotated[int, typer.Option("--max-objects", help="objects per image, at most (1..4)")] = 4,
    image_format: Annotated[str, typer.Option("--format", help="png or jpg")] = "png",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing dataset in OUT")] = False,
) -> None:
    """Write the synthetic shapes dataset (geometry decides the class) in COCO format."""
    with rich_progress() as progress:
        result = synthesize(out, n_train, n_val, size, seed, num_classes=num_classes, max_objects=max_objects,
                            image_format=image_format, overwrite=overwrite, progress=progress)
    console.print(
        f"wrote {result.n_train} train + {result.n_val} val images ({result.size}px, seed {result.seed}, "
        f"{len(result.categories)} classes) to {result.root} in {result.seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )


@data_app.command("download")
def download(
    split: Annotated[list[str] | None, typer.Option("--split", help="split to fetch; repeat for several")] = None,
    dest: Annotated[Path, typer.Option("--dest", help="COCO root to create")] = Path("data/coco"),
    base_url: Annotated[str, typer.Option("--base-url", help="server holding zips/ and annotations/")] = COCO_BASE_URL,
    no_annotations: Annotated[bool, typer.Option("--no-annotations", help="images only")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the known size/md5 checks (mirrors)")] = False,
    keep_zips: Annotated[bool, typer.Option("--keep-zips", help="keep the zips after unpacking")] = False,
) -> None:
    """Download the official COCO 2017 zips (resumable) and unpack them into the official layout."""
    splits = split or ["val2017"]
    with rich_progress(transfer=True) as progress:
        result = download_coco(dest, splits, base_url=base_url, annotations=not no_annotations,
                               known={} if no_verify else None, keep_zips=keep_zips, progress=progress)
    fetched = ", ".join(result.downloaded) or "nothing (already there)"
    console.print(f"{', '.join(splits)} ready in {result.dest}; downloaded {fetched}", highlight=False, soft_wrap=True)


@data_app.command("prepare")
def prepare(
    root: Annotated[Path, typer.Argument(help="COCO root")],
    train_split: Annotated[str, typer.Option("--train-split")] = "train2017",
    val_split: Annotated[str, typer.Option("--val-split")] = "val2017",
    train_size: Annotated[str | None, typer.Option("--train-size", help="count, fraction in (0,1], or all")] = None,
    val_size: Annotated[str | None, typer.Option("--val-size", help="count, fraction in (0,1], or all")] = None,
    image_size: Annotated[int, typer.Option("--image-size", help="square side in px")] = 64,
    resize: Annotated[str, typer.Option("--resize", help=" | ".join(RESIZE_MODES))] = "squash",
    subset_seed: Annotated[int, typer.Option("--subset-seed")] = 0,
    cache_dir: Annotated[Path, typer.Option("--cache-dir")] = Path("results/cache"),
    drop_empty: Annotated[bool, typer.Option("--drop-empty", help="leave out images without annotations")] = False,
    no_crowd: Annotated[bool, typer.Option("--no-crowd", help="crowd boxes do not count")] = False,
    strict_images: Annotated[bool, typer.Option("--strict-images", help="an unreadable image is an error")] = False,
    workers: Annotated[int | None, typer.Option("--workers", help="decode threads")] = None,
) -> None:
    """Decode and cache the train/val subsets a run would use (a second call loads from the cache)."""
    with warnings.catch_warnings(record=True) as caught, rich_progress() as progress:
        warnings.simplefilter("always")
        data = prepare_data(
            root, train_split, val_split, _size(train_size, "--train-size"), _size(val_size, "--val-size"),
            image_size, resize, subset_seed, cache_dir, drop_empty, not no_crowd, strict_images, workers, progress,
        )
    _report_warnings(caught)
    hit = {k: data.cache[k]["hit"] for k in ("train", "val")}
    console.print(
        f"train {len(data.train_ids)} / val {len(data.val_ids)} images at {image_size}px {resize}, "
        f"{data.num_classes} classes, {data.skipped} skipped; cache hit train={hit['train']} val={hit['val']} "
        f"({data.cache['seconds']:.2f} s)",
        highlight=False,
        soft_wrap=True,
    )


def _size(text: str | None, key: str) -> int | float | None:
    if text is None or text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise HarnessError(f"{key} {text!r}: expected a count, a fraction in (0, 1] or 'all'") from None
