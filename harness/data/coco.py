"""Reading a COCO root in the official layout: image list, categories, multi-hot targets, boxes.

A *split* is `ROOT/annotations/instances_<split>.json` plus the image folder `ROOT/<split>/`.
Classes are the annotation file's categories in ascending id order: for COCO 2017 that gives 80
classes for the ids 1..90 (which have gaps); `CocoSplit.categories` holds the id ↔ index ↔ name map.
Images are kept in ascending id order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError


def annotation_path(root: str | Path, split: str) -> Path:
    """`ROOT/annotations/instances_<split>.json`."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_dir(root: str | Path, split: str) -> Path:
    """`ROOT/<split>/`."""
    return Path(root) / split


@dataclass
class CocoSplit:
    """One split of a COCO-format dataset, reduced to what multi-label classification needs.

    `targets[i]` is the multi-hot vector of image `image_ids[i]` over `categories` (index order).
    `boxes[i]` is a float32 [K, 4] array of that image's boxes (x, y, w, h in the stored image's
    pixels), `box_labels[i]` their class indices and `box_crowd[i]` their iscrowd flags; only the
    annotations that count towards the targets are listed (crowd boxes are left out with
    include_crowd=False). `largest_areas[i]` is the area of the image's largest counted annotation in
    the original image's pixels (COCO's `area`, else the box's w·h, scaled by `orig_width`/`orig_height`
    when the file records a downscaled copy as coco-mini does); NaN for an image without one.
    """

    root: Path
    split: str
    annotation_file: Path
    image_dir: Path
    annotation_sha256: str
    categories: list[dict[str, Any]]
    image_ids: list[int]
    file_names: list[str]
    widths: list[int]
    heights: list[int]
    targets: np.ndarray
    boxes: list[np.ndarray] = field(repr=False)
    box_labels: list[np.ndarray] = field(repr=False)
    box_crowd: list[np.ndarray] = field(repr=False)
    num_annotations: int = 0
    include_crowd: bool = True
    drop_empty: bool = False
    largest_areas: list[float] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def paths(self) -> list[Path]:
        return [self.image_dir / name for name in self.file_names]

    @property
    def id_to_index(self) -> dict[int, int]:
        """Category id → class index."""
        return {c["id"]: c["index"] for c in self.categories}

    @property
    def index_to_id(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def subset(self, indices: np.ndarray | list[int]) -> CocoSplit:
        """The same split restricted to the images at `indices` (positions, in the given order)."""
        idx = [int(i) for i in indices]
        return CocoSplit(
            root=self.root, split=self.split, annotation_file=self.annotation_file, image_dir=self.image_dir,
            annotation_sha256=self.annotation_sha256, categories=self.categories,
            image_ids=[self.image_ids[i] for i in idx], file_names=[self.file_names[i] for i in idx],
            widths=[self.widths[i] for i in idx], heights=[self.heights[i] for i in idx],
            targets=self.targets[idx] if idx else self.targets[:0],
            boxes=[self.boxes[i] for i in idx], box_labels=[self.box_labels[i] for i in idx],
            box_crowd=[self.box_crowd[i] for i in idx],
            num_annotations=int(sum(len(self.box_labels[i]) for i in idx)),
            include_crowd=self.include_crowd, drop_empty=self.drop_empty,
            largest_areas=[self.largest_areas[i] for i in idx] if self.largest_areas else [],
        )


def _fail(path: Path, message: str) -> HarnessError:
    return HarnessError(f"{path}: {message}")


def _read_instances(path: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"cannot read annotation file ({exc.strerror or exc})") from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise _fail(path, f"not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise _fail(path, "not a COCO instances file (the top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise _fail(path, f"not a COCO instances file (missing key(s) {', '.join(repr(k) for k in missing)})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise _fail(path, f"not a COCO instances file ({key!r} is not a list)")
    if not data["categories"]:
        raise _fail(path, "not a COCO instances file ('categories' is empty)")
    return data, digest


def _check_fields(path: Path, key: str, items: list[Any], fields: dict[str, tuple[type, ...]]) -> None:
    for pos, item in enumerate(items):
        if not isinstance(item, dict):
            raise _fail(path, f"{key}[{pos}] is not an object")
        for name, types in fields.items():
            if name not in item:
                raise _fail(path, f"{key}[{pos}] has no {name!r}")
            value = item[name]
            if not isinstance(value, types) or isinstance(value, bool):
                raise _fail(path, f"{key}[{pos}].{name} = {value!r} has the wrong type")


def _check_paths(root: Path, split: str, check_image_dir: bool) -> tuple[Path, Path]:
    """The split's annotation file and image folder, after checking that they (and the root) exist."""
    if not root.is_dir():
        raise HarnessError(f"COCO root {root} does not exist or is not a directory")
    ann_file = annotation_path(root, split)
    if not ann_file.is_file():
        raise HarnessError(f"annotation file {ann_file} not found (split {split!r})")
    img_dir = image_dir(root, split)
    if check_image_dir and not img_dir.is_dir():
        raise HarnessError(f"image directory {img_dir} not found (split {split!r})")
    return ann_file, img_dir


def image_files(img_dir: Path) -> dict[str, bool] | None:
    """Name → whether it is a symbolic link, for every entry of `img_dir` (one `os.scandir`, no stat per
    file); None when the folder cannot be listed."""
    try:
        with os.scandir(img_dir) as entries:
            return {entry.name: entry.is_symlink() for entry in entries}
    except OSError:
        return None


def _plain_name(name: str) -> bool:
    """A single path component that names something inside its folder (the common, fast case)."""
    return "/" not in name and "\x00" not in name and name not in ("", ".", "..")


def _relative_inside(name: str) -> bool:
    """`name` is a relative path with no `..` component that names something below its folder."""
    if "\x00" in name or os.path.isabs(name):
        return False
    return ".." not in name.split("/") and os.path.normpath(name) != "."


def _check_file_names(ann_file: Path, img_dir: Path, images: list[dict[str, Any]],
                      files: dict[str, bool] | None) -> None:
    """Every image's file_name resolves inside `img_dir`: no absolute paths, no `..`, no symbolic link
    that leads out (the folder itself may be a link). `files` is `image_files(img_dir)`."""
    real_dir: str | None = None
    for info in images:
        name = info["file_name"]
        if _plain_name(name):
            if not (files and files.get(name)):
                continue  # a plain file (or a missing one): inside by construction
        elif not _relative_inside(name):
            raise _outside(ann_file, img_dir, info)
        if real_dir is None:
            real_dir = os.path.realpath(img_dir)
        real = os.path.realpath(os.path.join(img_dir, name))
        if real == real_dir or os.path.commonpath([real_dir, real]) != real_dir:
            raise _outside(ann_file, img_dir, info)


def _outside(ann_file: Path, img_dir: Path, info: dict[str, Any]) -> HarnessError:
    return _fail(ann_file, f"image id {info['id']} has file_name {info['file_name']!r}, which is not inside "
                           f"the image folder {img_dir}")


def category_difference(a: CocoSplit, b: CocoSplit, limit: int = 5) -> str | None:
    """Which categories differ between two splits, as a short phrase; None when ids and names agree."""
    names_a = {c["id"]: c["name"] for c in a.categories}
    names_b = {c["id"]: c["name"] for c in b.categories}

    def listed(items: list[str]) -> str:
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = []
    only_a = [f"{cid} {names_a[cid]!r}" for cid in sorted(names_a.keys() - names_b.keys())]
    only_b = [f"{cid} {names_b[cid]!r}" for cid in sorted(names_b.keys() - names_a.keys())]
    renamed = [f"{cid} {names_a[cid]!r} vs {names_b[cid]!r}"
               for cid in sorted(names_a.keys() & names_b.keys()) if names_a[cid] != names_b[cid]]
    if only_a:
        parts.append(f"ids only in {a.split}: {listed(only_a)}")
    if only_b:
        parts.append(f"ids only in {b.split}: {listed(only_b)}")
    if renamed:
        parts.append(f"names differ: {listed(renamed)}")
    return "; ".join(parts) or None


def _index_instances(ann_file: Path, data: dict[str, Any]) -> Any:
    """A pycocotools `COCO` index over the (field-checked) instances `data`; duplicate ids are errors."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    if len(coco.cats) != len(data["categories"]):
        raise _fail(ann_file, "duplicate category ids in 'categories'")
    if len(coco.imgs) != len(data["images"]):
        raise _fail(ann_file, "duplicate image ids in 'images'")
    return coco


def _check_annotation_refs(ann_file: Path, annotations: list[dict[str, Any]], id_to_index: dict[int, int],
                           images: dict[int, Any]) -> None:
    """Every annotation names a known category and a known image."""
    for pos, ann in enumerate(annotations):
        if ann["category_id"] not in id_to_index:
            raise _fail(
                ann_file,
                f"annotations[{pos}] (id {ann.get('id')}, image {ann['image_id']}) has category_id "
                f"{ann['category_id']}, which is not in 'categories'",
            )
        if ann["image_id"] not in images:
            raise _fail(ann_file, f"annotations[{pos}] (id {ann.get('id')}) has unknown image_id {ann['image_id']}")


@dataclass
class _ImageRows:
    """The per-image columns of a `CocoSplit`, filled image by image."""

    image_ids: list[int] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    crowds: list[np.ndarray] = field(default_factory=list)
    largest: list[float] = field(default_factory=list)


def _largest_area(info: dict[str, Any], anns: list[dict[str, Any]], boxes: np.ndarray) -> float:
    """The largest annotation's area in the original image's pixels (see `CocoSplit`); NaN without one."""
    if not anns:
        return math.nan
    areas = [float(a["area"]) if isinstance(a.get("area"), int | float) and not isinstance(a.get("area"), bool)
             else float(box[2] * box[3]) for a, box in zip(anns, boxes, strict=True)]
    scale = 1.0
    orig_w, orig_h = info.get("orig_width"), info.get("orig_height")
    if isinstance(orig_w, int | float) and isinstance(orig_h, int | float) and info["width"] and info["height"]:
        scale = float(orig_w) * float(orig_h) / (float(info["width"]) * float(info["height"]))
    return max(areas) * scale


def _image_rows(ann_file: Path, coco: Any, id_to_index: dict[int, int], *, include_crowd: bool,
                drop_empty: bool) -> _ImageRows:
    """Targets, boxes, labels and crowd flags of every kept image, in ascending image id order."""
    out = _ImageRows()
    n_classes = len(id_to_index)
    for img_id in sorted(coco.getImgIds()):
        anns = coco.imgToAnns.get(img_id, [])
        if not include_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        if drop_empty and not anns:
            continue
        info = coco.imgs[img_id]
        row = np.zeros(n_classes, dtype=np.float32)
        lab = np.array([id_to_index[a["category_id"]] for a in anns], dtype=np.int64)
        row[lab] = 1.0
        box = np.zeros((len(anns), 4), dtype=np.float32)
        for k, a in enumerate(anns):
            bbox = a.get("bbox")
            if isinstance(bbox, list | tuple) and len(bbox) == 4:
                try:
                    box[k] = bbox
                except (TypeError, ValueError):
                    raise _fail(ann_file, f"annotation id {a['id']} has bbox {bbox!r}: not 4 numbers") from None
        out.image_ids.append(int(img_id))
        out.file_names.append(str(info["file_name"]))
        out.widths.append(int(info["width"]))
        out.heights.append(int(info["height"]))
        out.rows.append(row)
        out.boxes.append(box)
        out.labels.append(lab)
        out.crowds.append(np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool))
        out.largest.append(_largest_area(info, anns, box))
    return out


def load_split(
    root: str | Path,
    split: str = "val2017",
    *,
    drop_empty: bool = False,
    include_crowd: bool = True,
    check_image_dir: bool = True,
) -> CocoSplit:
    """Read `ROOT/annotations/instances_<split>.json` (through pycocotools) into a `CocoSplit`.

    Images without (counted) annotations stay in as all-negative unless `drop_empty`; crowd boxes
    count unless `include_crowd=False`. Raises `HarnessError` naming the path or key for a missing
    root, annotation file or image folder, a file that is not COCO instances JSON, an annotation
    whose category_id or image_id is unknown, or an image whose file_name does not resolve inside the
    image folder (absolute, `..`, or a symbolic link leading out), so no path outside it is ever read.
    """
    root = Path(root)
    ann_file, img_dir = _check_paths(root, split, check_image_dir)

    data, digest = _read_instances(ann_file)
    _check_fields(ann_file, "categories", data["categories"], {"id": (int,), "name": (str,)})
    _check_fields(ann_file, "images", data["images"],
                  {"id": (int,), "file_name": (str,), "width": (int,), "height": (int,)})
    _check_file_names(ann_file, img_dir, data["images"], image_files(img_dir))
    _check_fields(ann_file, "annotations", data["annotations"],
                  {"id": (int,), "image_id": (int,), "category_id": (int,)})
    coco = _index_instances(ann_file, data)

    cat_ids = sorted(coco.getCatIds())
    categories = [
        {"id": cid, "name": str(coco.cats[cid]["name"]), "index": index,
         "supercategory": str(coco.cats[cid].get("supercategory", ""))}
        for index, cid in enumerate(cat_ids)
    ]
    id_to_index = {cid: index for index, cid in enumerate(cat_ids)}
    _check_annotation_refs(ann_file, data["annotations"], id_to_index, coco.imgs)

    img = _image_rows(ann_file, coco, id_to_index, include_crowd=include_crowd, drop_empty=drop_empty)
    targets = np.stack(img.rows) if img.rows else np.zeros((0, len(categories)), dtype=np.float32)
    return CocoSplit(
        root=root, split=split, annotation_file=ann_file, image_dir=img_dir, annotation_sha256=digest,
        categories=categories, image_ids=img.image_ids, file_names=img.file_names, widths=img.widths,
        heights=img.heights, targets=targets, boxes=img.boxes, box_labels=img.labels, box_crowd=img.crowds,
        num_annotations=int(sum(len(lab) for lab in img.labels)), include_crowd=include_crowd,
        drop_empty=drop_empty, largest_areas=img.largest,
    )


def split_summary(split: CocoSplit) -> dict[str, Any]:
    """Counts for `harness data info`: images, annotations, empty images, per-category image counts."""
    per_cat_images = split.targets.sum(axis=0).astype(int) if len(split) else np.zeros(split.num_classes, int)
    per_cat_anns = np.zeros(split.num_classes, dtype=int)
    crowd = 0
    for lab, cr in zip(split.box_labels, split.box_crowd, strict=True):
        np.add.at(per_cat_anns, lab, 1)
        crowd += int(cr.sum())
    return {
        "root": str(split.root),
        "split": split.split,
        "annotation_file": str(split.annotation_file),
        "images": len(split),
        "annotations": split.num_annotations,
        "crowd_annotations": crowd,
        "images_without_annotations": int((split.targets.sum(axis=1) == 0).sum()) if len(split) else 0,
        "num_classes": split.num_classes,
        "categories": [
            {"id": c["id"], "index": c["index"], "name": c["name"],
             "images": int(per_cat_images[c["index"]]), "annotations": int(per_cat_anns[c["index"]])}
            for c in split.categories
        ],
    }
