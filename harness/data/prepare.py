"""`prepare_data`: the one call the runner makes to get train/val tensors for an ablation run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.cache import (
    CachedImages,
    DecodeFailure,
    check_resize_mode,
    load_or_build,
    transform_boxes,
    warn_skipped,
)
from harness.data.coco import CocoSplit, category_difference, load_split
from harness.data.subsets import SubsetSize, nested_subset
from harness.errors import HarnessError

Progress = Callable[[str, int, int], None]


@dataclass
class PreparedData:
    """Train and val images (uint8 [N, 3, S, S]) with their multi-hot targets (float32 [N, C]).

    `train_split` / `val_split` are the `CocoSplit`s lined up row for row with the tensors (ids,
    file paths, sizes, boxes). `skipped` counts the images left out as unreadable (both splits);
    `failures` lists them.
    """

    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor
    categories: list[dict[str, Any]]
    train_ids: list[int]
    val_ids: list[int]
    skipped: int
    train_split: CocoSplit = field(repr=False)
    val_split: CocoSplit = field(repr=False)
    image_size: int = 64
    resize: str = "squash"
    failures: list[DecodeFailure] = field(default_factory=list, repr=False)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def boxes(self, which: str = "val") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image of `which` ("train" or "val"): (boxes x0, y0, x1, y1 in the S×S tensor's pixels, class indices)."""
        split = {"train": self.train_split, "val": self.val_split}.get(which)
        if split is None:
            raise HarnessError(f"boxes({which!r}): expected 'train' or 'val'")
        return [
            (transform_boxes(b, w, h, self.image_size, self.resize), lab)
            for b, lab, w, h in zip(split.boxes, split.box_labels, split.widths, split.heights, strict=True)
        ]

    def summary(self) -> dict[str, Any]:
        """Plain-JSON description for run records."""
        return {
            "train_images": len(self.train_ids), "val_images": len(self.val_ids),
            "num_classes": self.num_classes, "image_size": self.image_size, "resize": self.resize,
            "skipped": self.skipped, "train_split": self.train_split.split, "val_split": self.val_split.split,
            "annotation_sha256": {"train": self.train_split.annotation_sha256, "val": self.val_split.annotation_sha256},
            "cache": self.cache,
        }


def same_categories(train: CocoSplit, val: CocoSplit) -> None:
    """Train and val have the same categories (ids and names), else one line saying which differ."""
    difference = category_difference(train, val)
    if difference:
        raise HarnessError(
            f"{train.annotation_file} and {val.annotation_file} have different categories ({difference}); "
            "train and val must share one class list"
        )


def _cached(split: CocoSplit, image_size: int, resize: str, cache_dir: Path | None, strict: bool,
            workers: int | None, progress: Progress | None) -> tuple[CocoSplit, CachedImages]:
    cached = load_or_build(split, image_size, resize, cache_dir, strict=strict, workers=workers, progress=progress)
    if cached.failures:
        split = split.subset(cached.kept)
        warn_skipped(split, cached.failures)
    if len(split) == 0:
        raise HarnessError(f"{split.image_dir}: no readable images in the selected {split.split} subset")
    return split, cached


def prepare_data(
    root: str | Path,
    train_split: str = "train2017",
    val_split: str = "val2017",
    train_size: SubsetSize = None,
    val_size: SubsetSize = None,
    image_size: int = 64,
    resize: str = "squash",
    subset_seed: int = 0,
    cache_dir: str | Path | None = "results/cache",
    drop_empty: bool = False,
    include_crowd: bool = True,
    strict_images: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> PreparedData:
    """Load (from the cache, or decode once and cache) the train and val subsets of a COCO root.

    Subsets: `train_size`/`val_size` are a count, a fraction in (0, 1] or None (all), drawn as the
    prefix of a permutation seeded by `subset_seed` and the split name, so subsets of one seed are
    nested and val stays fixed while train varies. When `train_split == val_split`, val takes the
    head of the permutation and train a prefix of the rest (disjoint); `val_size` is then required.
    Unreadable images are skipped (counted in `skipped`, one `SkippedImagesWarning` per split)
    unless `strict_images`, which raises `HarnessError`. `cache_dir=None` disables the cache.
    """
    t0 = time.perf_counter()
    check_resize_mode(resize)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise HarnessError(f"image_size = {image_size!r}: expected a positive number of pixels")
    train = load_split(root, train_split, drop_empty=drop_empty, include_crowd=include_crowd)
    if val_split == train_split:
        if val_size is None:
            raise HarnessError(
                f"train_split and val_split are both {train_split!r}: give val_size so that disjoint "
                "train and val subsets can be drawn from it"
            )
        val = train
        val_idx = nested_subset(len(val), val_size, subset_seed, val_split, key="val_size")
        train_idx = nested_subset(len(train), train_size, subset_seed, train_split, key="train_size",
                                  skip=len(val_idx))
    else:
        val = load_split(root, val_split, drop_empty=drop_empty, include_crowd=include_crowd)
        same_categories(train, val)
        train_idx = nested_subset(len(train), train_size, subset_seed, train_split, key="train_size")
        val_idx = nested_subset(len(val), val_size, subset_seed, val_split, key="val_size")

    cdir = Path(cache_dir) if cache_dir is not None else None
    train_sub, train_cache = _cached(train.subset(train_idx), image_size, resize, cdir, strict_images, workers,
                                     progress)
    val_sub, val_cache = _cached(val.subset(val_idx), image_size, resize, cdir, strict_images, workers, progress)
    failures = train_cache.failures + val_cache.failures
    return PreparedData(
        train_images=torch.from_numpy(train_cache.images),
        train_targets=torch.from_numpy(np.ascontiguousarray(train_sub.targets, dtype=np.float32)),
        val_images=torch.from_numpy(val_cache.images),
        val_targets=torch.from_numpy(np.ascontiguousarray(val_sub.targets, dtype=np.float32)),
        categories=[{"id": c["id"], "name": c["name"], "index": c["index"]} for c in train.categories],
        train_ids=list(train_sub.image_ids),
        val_ids=list(val_sub.image_ids),
        skipped=len(failures),
        train_split=train_sub,
        val_split=val_sub,
        image_size=image_size,
        resize=resize,
        failures=failures,
        cache={
            "train": {"path": str(train_cache.path), "hit": train_cache.hit, "seconds": round(train_cache.seconds, 4)},
            "val": {"path": str(val_cache.path), "hit": val_cache.hit, "seconds": round(val_cache.seconds, 4)},
            "seconds": round(time.perf_counter() - t0, 4),
        },
    )
