"""A procedural COCO-format dataset where geometry decides the class.

Eight shape classes (disk, ring, triangle, frame, cross, star, crescent, ell) are drawn with strong
variation of scale (object radius from about 9% to 40% of the image), rotation (any angle), aspect
ratio (stretched up to 1.8× along a random axis), mirroring and a smooth local (elastic) warp, one to
four objects per image (multi-label). Colours and fill textures are drawn independently of the class
and every image carries a gradient background, thin clutter strokes, dots and pixel noise, so colour
or texture alone does not tell the class: the shape does. A rigid 3×3 sampling grid has to see the
same class at many scales, orientations and deformations — the case deformable convolution is meant
for.

Everything is drawn with vectorised numpy on whole chunks of images; each chunk has its own
generator seeded by (seed, split, chunk), so the output depends only on the seed and the sizes (not
on the number of workers). Files are written in the official layout and the annotation JSON last
(atomically), so a half-finished directory has no annotation file.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.errors import HarnessError

Progress = Callable[[str, int, int], None]

SHAPES: tuple[str, ...] = ("disk", "ring", "triangle", "frame", "cross", "star", "crescent", "ell")
_CHUNK = 128
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_VAL_ID_OFFSET = 1_000_000_000
_ID_OFFSETS = (0, _VAL_ID_OFFSET, 2 * _VAL_ID_OFFSET)  # train, val, ood (split codes 0, 1, 2)
OOD_SPLIT = "ood2017"


@dataclass(frozen=True)
class Geometry:
    """The ranges each object's geometry is drawn from; the defaults are the task's standard ranges.

    rotation: degrees, uniform. scale: object radius as a fraction of its layout cell (the cell is 0.9
    of the image for one object, about half of it for two to four), log-uniform; the radius is never
    below 9 % of the image. stretch: ratio of the object's two axes, log-uniform in magnitude, along a
    random one of them. warp: amplitude of the elastic displacement relative to the radius, uniform.
    Training on narrow ranges and testing on wider ones (`synthesize(ood_geometry=...)`) is the
    out-of-distribution protocol.
    """

    rotation: tuple[float, float] = (0.0, 360.0)
    scale: tuple[float, float] = (0.2, 0.46)
    stretch: tuple[float, float] = (1.0, 1.8)
    warp: tuple[float, float] = (0.0, 0.16)

    def check(self) -> None:
        """A HarnessError naming the first range that is inverted or out of its domain."""
        minimum = {"rotation": -math.inf, "scale": 1e-3, "stretch": 1.0, "warp": 0.0}
        for name, low_bound in minimum.items():
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and low_bound <= low <= high):
                raise HarnessError(
                    f"geometry {name} = [{low}, {high}]: expected finite low <= high"
                    + (f" with low >= {low_bound}" if math.isfinite(low_bound) else "")
                )


def _stretch_aspect(rng: np.random.Generator, stretch: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """Axis ratios whose magnitude is log-uniform in `stretch`, above or below 1 with equal chance."""
    low, high = math.log(stretch[0]), math.log(stretch[1])
    s = rng.uniform(-high, high, shape)
    magnitude = low + np.abs(s) * ((high - low) / high if high > 0 else 0.0)  # = |s| when low is 0
    return np.exp(np.copysign(magnitude, s)).astype(np.float32)


def _box(u: np.ndarray, v: np.ndarray, cu: float, cv: float, hu: float, hv: float) -> np.ndarray:
    return np.minimum(hu - np.abs(u - cu), hv - np.abs(v - cv))


def shape_sdf(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (> 0 inside) of a class shape in canonical units (shape within ~[-1, 1]²)."""
    if name == "disk":
        return 0.75 - np.hypot(u, v)
    if name == "ring":
        r = np.hypot(u, v)
        return np.minimum(r - 0.45, 0.85 - r)
    if name == "triangle":  # equilateral, inradius 0.5 (circumradius 1)
        edges = [0.5 - (u * math.cos(a) + v * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return np.minimum(np.minimum(edges[0], edges[1]), edges[2])
    if name == "frame":  # hollow square
        m = np.maximum(np.abs(u), np.abs(v))
        return np.minimum(0.8 - m, m - 0.42)
    if name == "cross":
        return np.maximum(_box(u, v, 0, 0, 0.24, 0.9), _box(u, v, 0, 0, 0.9, 0.24))
    if name == "star":  # five spikes
        r = np.hypot(u, v)
        t = np.arctan2(v, u)
        edge = 0.35 + 0.6 * (0.5 + 0.5 * np.cos(5 * t)) ** 2
        return (edge - r) * 0.7
    if name == "crescent":
        return np.minimum(0.85 - np.hypot(u, v), np.hypot(u - 0.42, v + 0.1) - 0.62)
    if name == "ell":
        return np.maximum(_box(u, v, -0.55, 0.0, 0.25, 0.85), _box(u, v, 0.0, 0.6, 0.8, 0.25))
    raise HarnessError(f"unknown synthetic shape {name!r}; known: {', '.join(SHAPES)}")


def _colours(rng: np.random.Generator, n: int, lum_lo: np.ndarray, lum_hi: np.ndarray) -> np.ndarray:
    """n random RGB colours in 0..1 with luminance drawn in [lum_lo, lum_hi] (arrays of n)."""
    rgb = rng.random((n, 3), dtype=np.float32) * 0.9 + 0.05
    target = lum_lo + (lum_hi - lum_lo) * rng.random(n, dtype=np.float32)
    luma = rgb @ _LUMA
    return np.clip(rgb * (target / np.maximum(luma, 1e-3))[:, None], 0.0, 1.0)


# Layouts for 1..4 objects: cell centres (fractions of the image) and cell size (fraction).
_LAYOUTS: dict[int, tuple[list[tuple[float, float]], float]] = {
    1: ([(0.5, 0.5)], 0.9),
    2: ([(0.27, 0.5), (0.73, 0.5)], 0.5),
    3: ([(0.27, 0.27), (0.73, 0.27), (0.5, 0.74)], 0.48),
    4: ([(0.26, 0.26), (0.74, 0.26), (0.26, 0.74), (0.74, 0.74)], 0.48),
}


@dataclass
class _Objects:
    count: np.ndarray  # [B] objects per image
    cls: np.ndarray  # [B, K] class index
    cx: np.ndarray  # [B, K] centre x in px
    cy: np.ndarray
    radius: np.ndarray  # [B, K] px
    angle: np.ndarray
    aspect: np.ndarray
    mirror: np.ndarray
    warp: np.ndarray  # [B, K, 6] elastic amplitude/frequency/phase, u and v
    fill: np.ndarray  # [B, K, 2, 3] two colours
    stripe: np.ndarray  # [B, K, 3] amplitude, frequency, phase
    dark_bg: np.ndarray  # [B] dark background (objects light) or the reverse


def _draw_objects(rng: np.random.Generator, b: int, size: int, n_classes: int, max_objects: int,
                  geometry: Geometry) -> _Objects:
    k = max_objects
    weights = np.array([1.0, 1.3, 1.1, 1.0][:k])
    count = rng.choice(np.arange(1, k + 1), size=b, p=weights / weights.sum())
    cls = rng.integers(0, n_classes, size=(b, k))
    cx = np.zeros((b, k), np.float32)
    cy = np.zeros((b, k), np.float32)
    cell = np.zeros((b, k), np.float32)
    for n in range(1, k + 1):
        rows = count == n
        centres, cell_frac = _LAYOUTS[n]
        order = np.argsort(rng.random((int(rows.sum()), len(centres))), axis=1)[:, :n]
        pts = np.array(centres, np.float32)[order]  # [r, n, 2]
        cx[rows, :n] = pts[..., 0] * size
        cy[rows, :n] = pts[..., 1] * size
        cell[rows, :n] = cell_frac * size
    aspect = _stretch_aspect(rng, geometry.stretch, (b, k))
    stretch = np.maximum(aspect, 1 / aspect) ** 0.5
    # radius: log-uniform in geometry.scale of the layout cell (default 0.2..0.46: one object up to ~40% of the image)
    lo, hi = math.log(geometry.scale[0]), math.log(geometry.scale[1])
    radius = cell * np.exp(rng.uniform(lo, hi, (b, k))).astype(np.float32) / stretch ** 0.5
    radius = np.maximum(radius, 0.09 * size)
    jitter = (cell / 2 - radius * stretch).clip(0, None) * 0.6
    cx += rng.uniform(-1, 1, (b, k)).astype(np.float32) * jitter
    cy += rng.uniform(-1, 1, (b, k)).astype(np.float32) * jitter
    angle = rng.uniform(*np.radians(geometry.rotation), (b, k)).astype(np.float32)
    mirror = np.where(rng.random((b, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    warp = np.stack([
        rng.uniform(*geometry.warp, (b, k)), rng.uniform(1.5, 4.0, (b, k)), rng.uniform(0, 2 * math.pi, (b, k)),
        rng.uniform(*geometry.warp, (b, k)), rng.uniform(1.5, 4.0, (b, k)), rng.uniform(0, 2 * math.pi, (b, k)),
    ], axis=-1).astype(np.float32)
    dark_bg = rng.random(b) < 0.5
    lo = np.where(dark_bg, 0.55, 0.05).astype(np.float32)
    hi = np.where(dark_bg, 0.95, 0.45).astype(np.float32)
    lo_k, hi_k = np.repeat(lo, 2 * k), np.repeat(hi, 2 * k)
    fill = _colours(rng, b * k * 2, lo_k, hi_k).reshape(b, k, 2, 3)
    stripe = np.stack([
        np.where(rng.random((b, k)) < 0.5, 0.0, rng.uniform(0.3, 1.0, (b, k))),
        rng.uniform(3.0, 9.0, (b, k)), rng.uniform(0, 2 * math.pi, (b, k)),
    ], axis=-1).astype(np.float32)
    return _Objects(count, cls, cx, cy, radius, angle, aspect, mirror, warp, fill, stripe, dark_bg)


def _background(rng: np.random.Generator, b: int, size: int, dark_bg: np.ndarray) -> np.ndarray:
    """[B, S, S, 3] floats: two-colour linear gradient, soft blobs, clutter strokes and dots."""
    lo = np.where(dark_bg, 0.03, 0.55).astype(np.float32)
    hi = np.where(dark_bg, 0.42, 0.97).astype(np.float32)
    c0 = _colours(rng, b, lo, hi)
    c1 = _colours(rng, b, lo, hi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = rng.uniform(0, 2 * math.pi, b).astype(np.float32)
    t = (np.cos(ang)[:, None, None] * (xs - 0.5) + np.sin(ang)[:, None, None] * (ys - 0.5)) + 0.5
    img = c0[:, None, None, :] + (c1 - c0)[:, None, None, :] * np.clip(t, 0, 1)[..., None]
    # clutter: thin line segments (1-5) and small dots (0-6), colours from the object range
    n_lines = 5
    p0 = rng.uniform(0, size, (b, n_lines, 2)).astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi, (b, n_lines)).astype(np.float32)
    length = rng.uniform(0.15, 0.6, (b, n_lines)).astype(np.float32) * size
    p1 = p0 + np.stack([np.cos(direction), np.sin(direction)], -1) * length[..., None]
    width = rng.uniform(0.5, 1.1, (b, n_lines)).astype(np.float32)
    active = rng.random((b, n_lines)) < rng.uniform(0.2, 1.0, (b, 1))
    olo = np.where(dark_bg, 0.5, 0.0).astype(np.float32)
    ohi = np.where(dark_bg, 1.0, 0.5).astype(np.float32)
    colour = _colours(rng, b * n_lines, np.repeat(olo, n_lines), np.repeat(ohi, n_lines)).reshape(b, n_lines, 3)
    px = xs * size + 0.5
    py = ys * size + 0.5
    for j in range(n_lines):
        ax, ay = p0[:, j, 0, None, None], p0[:, j, 1, None, None]
        dx, dy = (p1[:, j, 0] - p0[:, j, 0])[:, None, None], (p1[:, j, 1] - p0[:, j, 1])[:, None, None]
        tt = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0, 1)
        dist = np.hypot(px - ax - tt * dx, py - ay - tt * dy)
        alpha = np.clip(width[:, j, None, None] - dist + 0.5, 0, 1) * active[:, j, None, None]
        img += (colour[:, j, None, None, :] - img) * alpha[..., None] * 0.8
    n_dots = 6
    dots = rng.uniform(0, size, (b, n_dots, 2)).astype(np.float32)
    dot_r = rng.uniform(0.7, 0.025 * size + 0.7, (b, n_dots)).astype(np.float32)
    dot_on = rng.random((b, n_dots)) < 0.5
    dot_c = _colours(rng, b * n_dots, np.repeat(olo, n_dots), np.repeat(ohi, n_dots)).reshape(b, n_dots, 3)
    for j in range(n_dots):
        dist = np.hypot(px - dots[:, j, 0, None, None], py - dots[:, j, 1, None, None])
        alpha = np.clip(dot_r[:, j, None, None] - dist + 0.5, 0, 1) * dot_on[:, j, None, None]
        img += (dot_c[:, j, None, None, :] - img) * alpha[..., None]
    return img


def render_chunk(
    seed: int, split_code: int, chunk: int, b: int, size: int, n_classes: int, max_objects: int = 4,
    geometry: Geometry | None = None,
) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    """Draw `b` images → (uint8 [B, S, S, 3], per image a list of {category index, bbox, area})."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, split_code, chunk])
    obj = _draw_objects(rng, b, size, n_classes, max_objects, geometry or Geometry())
    img = _background(rng, b, size, obj.dark_bg)
    px = np.arange(size, dtype=np.float32) + 0.5
    k = max_objects
    alphas = np.zeros((k, b, size, size), np.float32)
    for slot in range(k):
        active = obj.count > slot
        for c in range(n_classes):
            sel = np.nonzero(active & (obj.cls[:, slot] == c))[0]
            if sel.size == 0:
                continue

            def p(a: np.ndarray, sel: np.ndarray = sel, slot: int = slot) -> np.ndarray:
                return a[sel, slot][:, None, None]

            dx = px[None, None, :] - p(obj.cx)
            dy = px[None, :, None] - p(obj.cy)
            ca, sa = np.cos(p(obj.angle)), np.sin(p(obj.angle))
            sq = np.sqrt(p(obj.aspect))
            r = p(obj.radius)
            u = (ca * dx + sa * dy) / (r * sq) * p(obj.mirror)
            v = (-sa * dx + ca * dy) / (r / sq)
            w = obj.warp[sel, slot]
            u2 = u + w[:, 0, None, None] * np.sin(w[:, 1, None, None] * v + w[:, 2, None, None])
            v2 = v + w[:, 3, None, None] * np.sin(w[:, 4, None, None] * u + w[:, 5, None, None])
            d = shape_sdf(SHAPES[c], u2, v2)
            alpha = np.clip(d * r + 0.5, 0.0, 1.0)  # ~1 px antialiased edge
            alphas[slot, sel] = alpha
            st = obj.stripe[sel, slot]
            t = 0.5 + 0.5 * np.sin(st[:, 1, None, None] * u2 + st[:, 2, None, None])
            t = t * st[:, 0, None, None]
            f = obj.fill[sel, slot]
            colour = f[:, None, None, 0, :] + (f[:, 1] - f[:, 0])[:, None, None, :] * t[..., None]
            img[sel] += (colour - img[sel]) * alpha[..., None]
    noise = rng.uniform(0.01, 0.06, b).astype(np.float32)[:, None, None, None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * noise
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    # annotations from the visible part of each object (later objects cover earlier ones)
    covered = np.zeros((b, size, size), bool)
    visible = np.zeros((k, b, size, size), bool)
    own_area = (alphas > 0.5).sum(axis=(2, 3))
    for slot in range(k - 1, -1, -1):
        m = alphas[slot] > 0.5
        visible[slot] = m & ~covered
        covered |= m
    anns: list[list[dict[str, Any]]] = [[] for _ in range(b)]
    vis_area = visible.sum(axis=(2, 3))
    rows_any = visible.any(axis=3)
    cols_any = visible.any(axis=2)
    for i in range(b):
        for slot in range(int(obj.count[i])):
            area = int(vis_area[slot, i])
            if area < 4 or area < 0.3 * int(own_area[slot, i]):
                continue
            ys = np.nonzero(rows_any[slot, i])[0]
            xs = np.nonzero(cols_any[slot, i])[0]
            x0, y0 = int(xs[0]), int(ys[0])
            anns[i].append({
                "category": int(obj.cls[i, slot]),
                "bbox": [float(x0), float(y0), float(xs[-1] + 1 - x0), float(ys[-1] + 1 - y0)],
                "area": float(area),
            })
    return out, anns


@dataclass
class SynthResult:
    root: Path
    n_train: int
    n_val: int
    size: int
    seed: int
    categories: list[dict[str, Any]]
    seconds: float
    n_ood: int = 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_args(num_classes: int, max_objects: int, size: int, n_train: int, n_val: int, image_format: str) -> str:
    """Validate `synthesize`'s arguments; returns the image file extension (png or jpg)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise HarnessError(f"num_classes = {num_classes}: expected 1..{len(SHAPES)}")
    if not 1 <= max_objects <= 4:
        raise HarnessError(f"max_objects = {max_objects}: expected 1..4")
    if size < 16:
        raise HarnessError(f"size = {size}: synthetic images need at least 16 px")
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise HarnessError(f"n_train = {n_train}, n_val = {n_val}: expected non-negative counts, not both 0")
    ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(image_format.lower())
    if ext is None:
        raise HarnessError(f"image_format = {image_format!r}: expected png or jpg")
    return ext


@dataclass(frozen=True)
class _Spec:
    """What every image of one `synthesize` call shares."""

    seed: int
    size: int
    num_classes: int
    max_objects: int
    ext: str
    geometry: Geometry = Geometry()


def _prepare_image_dir(img_dir: Path, overwrite: bool) -> None:
    img_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:  # drop images of an earlier run (only files named like ours)
        for old in img_dir.iterdir():
            if re.fullmatch(r"\d{12}\.(png|jpg)", old.name):
                old.unlink()


def _save_chunk(spec: _Spec, split_code: int, chunk: int, b: int, img_dir: Path,
                id0: int) -> list[list[dict[str, Any]]]:
    """Render one chunk, write its image files and return its per-image annotations."""
    pixels, anns = render_chunk(spec.seed, split_code, chunk, b, spec.size, spec.num_classes, spec.max_objects,
                                spec.geometry)
    for j in range(b):
        image_id = id0 + chunk * _CHUNK + j
        im = Image.fromarray(pixels[j], "RGB")
        if spec.ext == "png":
            im.save(img_dir / f"{image_id:012d}.png", compress_level=1)
        else:
            im.save(img_dir / f"{image_id:012d}.jpg", quality=92)
    return anns


def _render_split(spec: _Spec, split_code: int, n: int, img_dir: Path, workers: int, progress: Progress | None,
                  done: int, total: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write the `n` images of one split; returns its COCO `images` and `annotations` lists.

    `done` images of `total` are finished before this split (for `progress`).
    """
    id0 = _ID_OFFSETS[split_code] + 1
    chunks = [(c, min(_CHUNK, n - c * _CHUNK)) for c in range((n + _CHUNK - 1) // _CHUNK)]

    def make(job: tuple[int, int]) -> list[list[dict[str, Any]]]:
        chunk, b = job
        return _save_chunk(spec, split_code, chunk, b, img_dir, id0)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="harness-synth") as pool:
        for (chunk, b), anns in zip(chunks, pool.map(make, chunks), strict=True):
            for j in range(b):
                image_id = id0 + chunk * _CHUNK + j
                images.append({"id": image_id, "file_name": f"{image_id:012d}.{spec.ext}", "width": spec.size,
                               "height": spec.size, "license": 0})
                for a in anns[j]:
                    annotations.append({
                        "id": len(annotations) + 1 + _ID_OFFSETS[split_code],
                        "image_id": image_id, "category_id": a["category"] + 1, "bbox": a["bbox"],
                        "area": a["area"], "iscrowd": 0, "segmentation": [],
                    })
            done += b
            if progress:
                progress("synthesizing", done, total)
    return images, annotations


def _instances(spec: _Spec, split: str, n: int, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
               categories: list[dict[str, Any]]) -> dict[str, Any]:
    """The COCO instances JSON of one split."""
    return {
        "info": {
            "description": "harness synthetic shapes: geometry decides the class",
            "version": "1", "year": 2025, "contributor": "harness.data.synth",
            "generator": {"seed": spec.seed, "size": spec.size, "n": n, "split": split,
                          "num_classes": spec.num_classes, "max_objects": spec.max_objects,
                          "geometry": {k: list(v) for k, v in vars(spec.geometry).items()}},
        },
        "licenses": [{"id": 0, "name": "generated", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def synthesize(
    out: str | Path,
    n_train: int = 2000,
    n_val: int = 500,
    size: int = 64,
    seed: int = 0,
    *,
    num_classes: int = len(SHAPES),
    max_objects: int = 4,
    image_format: str = "png",
    train_split: str = "train2017",
    val_split: str = "val2017",
    workers: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    geometry: Geometry | None = None,
    n_ood: int = 0,
    ood_geometry: Geometry | None = None,
) -> SynthResult:
    """Write the synthetic shapes dataset to `out` in the official COCO layout; deterministic by `seed`.

    Train and val draw their objects from `geometry` (default `Geometry()`); with `n_ood > 0` a third
    split, OOD_SPLIT, of `n_ood` images draws them from `ood_geometry` (required then), from its own
    random stream. Category ids are 1..num_classes in the order of `SHAPES`. Raises `HarnessError` when
    `out` already holds the annotation files (unless `overwrite`) or an argument is out of range.
    """
    t0 = time.perf_counter()
    out = Path(out)
    ext = _check_args(num_classes, max_objects, size, n_train, n_val, image_format)
    geometry = geometry or Geometry()
    geometry.check()
    if n_ood < 0 or (n_ood > 0) != (ood_geometry is not None):
        raise HarnessError(f"n_ood = {n_ood}: an ood set needs n_ood > 0 and ood_geometry, both or neither")
    jobs = [(0, train_split, n_train, geometry), (1, val_split, n_val, geometry)]
    if n_ood and ood_geometry is not None:
        ood_geometry.check()
        jobs.append((2, OOD_SPLIT, n_ood, ood_geometry))
    ann_dir = out / "annotations"
    for _, split, _, _ in jobs:
        if (ann_dir / f"instances_{split}.json").exists() and not overwrite:
            raise HarnessError(f"{ann_dir / f'instances_{split}.json'} already exists (pass overwrite to replace it)")
    ann_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": SHAPES[i], "supercategory": "shape"} for i in range(num_classes)]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    total = n_train + n_val + n_ood
    done = 0
    if progress:
        progress("synthesizing", 0, total)
    for split_code, split, n, split_geometry in jobs:
        spec = _Spec(seed, size, num_classes, max_objects, ext, split_geometry)
        img_dir = out / split
        _prepare_image_dir(img_dir, overwrite)
        images, annotations = _render_split(spec, split_code, n, img_dir, workers, progress, done, total)
        done += n
        _write_json(ann_dir / f"instances_{split}.json", _instances(spec, split, n, images, annotations, categories))
    return SynthResult(out, n_train, n_val, size, seed, categories, time.perf_counter() - t0, n_ood)
