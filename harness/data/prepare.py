"""`prepare_data`: the one call the runner makes to get train/val tensors for an ablation run."""

from __future__ import annotations

import math
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
from harness.data.subsets import SubsetSize, nested_subset, tail_subset
from harness.errors import HarnessError

Progress = Callable[[str, int, int], None]


@dataclass
class PreparedData:
    """Train and val images (uint8 [N, 3, S, S]) with their multi-hot targets (float32 [N, C]), and the
    optional held-out sets: test (drawn from the val split, disjoint from val) and ood (a whole split).

    `train_split` / `val_split` / `test_split` / `ood_split` are the `CocoSplit`s lined up row for row
    with the tensors (ids, file paths, sizes, boxes). `skipped` counts the images left out as unreadable
    (every split); `failures` lists them.
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
    test_images: torch.Tensor | None = field(default=None, repr=False)
    test_targets: torch.Tensor | None = field(default=None, repr=False)
    test_ids: list[int] = field(default_factory=list)
    test_split: CocoSplit | None = field(default=None, repr=False)
    ood_images: torch.Tensor | None = field(default=None, repr=False)
    ood_targets: torch.Tensor | None = field(default=None, repr=False)
    ood_ids: list[int] = field(default_factory=list)
    ood_split: CocoSplit | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def split(self, which: str) -> CocoSplit:
        """The `CocoSplit` of "train", "val", "test" or "ood" (a HarnessError when there is no such set)."""
        split = {"train": self.train_split, "val": self.val_split, "test": self.test_split,
                 "ood": self.ood_split}.get(which)
        if split is None:
            raise HarnessError(f"no {which!r} set here: expected 'train', 'val', or a test / ood set that was prepared")
        return split

    def boxes(self, which: str = "val") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image of `which` (see `split`): (boxes x0, y0, x1, y1 in the S×S tensor's pixels, class indices)."""
        split = self.split(which)
        return [
            (transform_boxes(b, w, h, self.image_size, self.resize), lab)
            for b, lab, w, h in zip(split.boxes, split.box_labels, split.widths, split.heights, strict=True)
        ]

    def largest_areas(self, which: str = "val") -> np.ndarray:
        """Per image of `which`: its largest object's area in original-image pixels (NaN: no object),
        the quantity COCO's small / medium / large buckets are defined on."""
        split = self.split(which)
        return np.asarray(split.largest_areas if split.largest_areas else [math.nan] * len(split), dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        """Plain-JSON description for run records."""
        return {
            "train_images": len(self.train_ids), "val_images": len(self.val_ids),
            "test_images": len(self.test_ids), "ood_images": len(self.ood_ids),
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


def _draw(train: CocoSplit, val: CocoSplit, train_size: SubsetSize, val_size: SubsetSize, test_size: SubsetSize,
          subset_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the train, val and test subsets (see `prepare_data`); `val is train` for one split."""
    test_idx = tail_subset(len(val), test_size, subset_seed, val.split, key="test_size")
    if len(val) - len(test_idx) < 1:
        raise HarnessError(
            f"test_size = {test_size} takes all {len(val)} images of split {val.split!r}, which leaves none for val"
        )
    if val is train:
        if val_size is None:
            raise HarnessError(
                f"train_split and val_split are both {train.split!r}: give val_size so that disjoint "
                "train and val subsets can be drawn from it"
            )
        val_idx = nested_subset(len(val), val_size, subset_seed, val.split, key="val_size", tail=len(test_idx))
        train_idx = nested_subset(len(train), train_size, subset_seed, train.split, key="train_size",
                                  skip=len(val_idx), tail=len(test_idx))
    else:
        train_idx = nested_subset(len(train), train_size, subset_seed, train.split, key="train_size")
        val_idx = nested_subset(len(val), val_size, subset_seed, val.split, key="val_size", tail=len(test_idx))
    return train_idx, val_idx, test_idx


def _targets(split: CocoSplit) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(split.targets, dtype=np.float32))


def _cache_record(cached: CachedImages) -> dict[str, Any]:
    return {"path": str(cached.path), "hit": cached.hit, "seconds": round(cached.seconds, 4)}


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
    test_size: SubsetSize = None,
    ood_split: str | None = None,
) -> PreparedData:
    """Load (from the cache, or decode once and cache) the train and val subsets of a COCO root, and
    the test subset and out-of-distribution split when asked for.

    Subsets: `train_size`/`val_size` are a count, a fraction in (0, 1] or None (all), drawn as the
    prefix of a permutation seeded by `subset_seed` and the split name, so subsets of one seed are
    nested and val stays fixed while train varies. When `train_split == val_split`, val takes the
    head of the permutation and train a prefix of the rest (disjoint); `val_size` is then required.
    `test_size` (None: no test set) takes the tail of the val split's permutation, so test never shares
    an image with val or train and leaves a given val subset unchanged; `val_size` then counts from the
    images left. `ood_split` names a whole split of the same root read as the ood set.
    Unreadable images are skipped (counted in `skipped`, one `SkippedImagesWarning` per split)
    unless `strict_images`, which raises `HarnessError`. `cache_dir=None` disables the cache.
    """
    t0 = time.perf_counter()
    check_resize_mode(resize)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise HarnessError(f"image_size = {image_size!r}: expected a positive number of pixels")
    train = load_split(root, train_split, drop_empty=drop_empty, include_crowd=include_crowd)
    val = train if val_split == train_split else load_split(root, val_split, drop_empty=drop_empty,
                                                            include_crowd=include_crowd)
    if val is not train:
        same_categories(train, val)
    train_idx, val_idx, test_idx = _draw(train, val, train_size, val_size, test_size, subset_seed)

    cdir = Path(cache_dir) if cache_dir is not None else None
    parts = {"train": train.subset(train_idx), "val": val.subset(val_idx)}
    if len(test_idx):
        parts["test"] = val.subset(test_idx)
    if ood_split is not None:
        parts["ood"] = load_split(root, ood_split, drop_empty=drop_empty, include_crowd=include_crowd)
        same_categories(train, parts["ood"])
    loaded = {which: _cached(split, image_size, resize, cdir, strict_images, workers, progress)
              for which, split in parts.items()}
    failures = [f for _, cached in loaded.values() for f in cached.failures]
    held_out: dict[str, Any] = {}
    for which in ("test", "ood"):
        if which in loaded:
            split, cached = loaded[which]
            held_out.update({f"{which}_images": torch.from_numpy(cached.images), f"{which}_targets": _targets(split),
                             f"{which}_ids": list(split.image_ids), f"{which}_split": split})
    (train_sub, train_cache), (val_sub, val_cache) = loaded["train"], loaded["val"]
    return PreparedData(
        train_images=torch.from_numpy(train_cache.images), train_targets=_targets(train_sub),
        val_images=torch.from_numpy(val_cache.images), val_targets=_targets(val_sub),
        categories=[{"id": c["id"], "name": c["name"], "index": c["index"]} for c in train.categories],
        train_ids=list(train_sub.image_ids), val_ids=list(val_sub.image_ids), skipped=len(failures),
        train_split=train_sub, val_split=val_sub, image_size=image_size, resize=resize, failures=failures,
        cache={**{which: _cache_record(cached) for which, (_, cached) in loaded.items()},
               "seconds": round(time.perf_counter() - t0, 4)},
        **held_out,
    )
