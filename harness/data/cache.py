"""Decode-once image cache: COCO images decoded to RGB, resized to S×S, stored as uint8 [N, 3, S, S].

An entry is a plain `.npy` array plus a small `.json` sidecar under the cache dir (default
`results/cache/`), named by a hash of everything that changes its content: the annotation file's
bytes, the image folder, the image ids in order, each image file's size and mtime, the image size,
the resize mode and the decoder version. Both files are written to a temporary file in the same
directory and moved into place with `os.replace`, the array first and the sidecar last; an entry is
trusted only when its sidecar names the same key and the array has the recorded shape and byte size.
So a killed build never leaves an entry that is trusted later, and any change of inputs builds a
new entry.

Decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing; JPEGs are
decoded at a reduced scale with `Image.draft`). Library code prints nothing: pass a `progress`
callback `(description, done, total)` to follow it. Unreadable images (missing, truncated, not an
image) are skipped and reported in `CachedImages.failures` unless `strict=True`, which raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.data.coco import CocoSplit
from harness.errors import HarnessError, HarnessWarning, one_line

Progress = Callable[[str, int, int], None]

RESIZE_MODES = ("squash", "center-crop", "letterbox")
PAD_RGB = (124, 116, 104)  # ImageNet mean: letterbox bars and transparent pixels normalise to ≈ 0
CACHE_VERSION = 1  # bump when decoding or resizing changes what is stored
_RESAMPLE = Image.Resampling.BILINEAR  # antialiased when downscaling
_STALE_TEMP_SECONDS = 3600.0


class SkippedImagesWarning(HarnessWarning):
    """Some images could not be read and were left out (see `PreparedData.skipped`)."""


@dataclass
class DecodeFailure:
    position: int
    image_id: int
    path: str
    reason: str


@dataclass
class CachedImages:
    """The decoded images of a split (or subset) and where they came from.

    `images` has one row per image that could be read; `kept` holds those images' positions in the
    split that was passed in, so `split.subset(kept)` lines targets up with `images`.
    """

    images: np.ndarray
    kept: np.ndarray
    failures: list[DecodeFailure]
    key: str
    path: Path
    hit: bool
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise HarnessError(f"resize = {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    return mode


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB (grayscale, palette, CMYK, 16-bit; alpha composited onto PAD_RGB)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, PAD_RGB)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0:
            arr = arr / 257.0  # 16-bit samples
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def resize_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize an RGB image to size×size: squash (ignore aspect), center-crop or letterbox (pad)."""
    w, h = img.size
    if mode == "squash":
        return img.resize((size, size), _RESAMPLE)
    if mode == "center-crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return img.crop((left, top, left + side, top + side)).resize((size, size), _RESAMPLE)
    if mode == "letterbox":
        scale = size / max(w, h)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        canvas = Image.new("RGB", (size, size), PAD_RGB)
        canvas.paste(img.resize((nw, nh), _RESAMPLE), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise HarnessError(f"resize = {mode!r}: expected one of {', '.join(RESIZE_MODES)}")


def decode_image(path: str | Path, size: int, mode: str = "squash") -> np.ndarray:
    """Read one image file → uint8 [3, size, size]. Raises OSError/ValueError for unreadable files."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale when still >= size
        img.load()
        rgb = resize_image(_to_rgb(img), size, mode)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def transform_boxes(boxes_xywh: np.ndarray, width: int, height: int, size: int, mode: str) -> np.ndarray:
    """Map boxes (x, y, w, h in the stored image's pixels) to x0, y0, x1, y1 in the cached S×S image.

    Boxes are clipped to the image; a box cut away entirely by center-crop gets zero width/height.
    """
    b = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    if mode == "squash":
        sx, sy, ox, oy = size / width, size / height, 0.0, 0.0
    elif mode == "center-crop":
        side = min(width, height)
        sx = sy = size / side
        ox, oy = -((width - side) // 2) * sx, -((height - side) // 2) * sy
    elif mode == "letterbox":
        scale = size / max(width, height)
        nw, nh = max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))
        sx, sy = nw / width, nh / height
        ox, oy = float((size - nw) // 2), float((size - nh) // 2)
    else:
        raise HarnessError(f"resize = {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    out = np.stack([x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy], axis=1)
    return np.clip(out, 0.0, float(size)).astype(np.float32)


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def decode_images(
    paths: Sequence[str | Path],
    size: int,
    mode: str = "squash",
    *,
    workers: int | None = None,
    strict: bool = False,
    progress: Progress | None = None,
    description: str = "decoding",
    image_ids: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[DecodeFailure]]:
    """Decode `paths` in a thread pool → (uint8 [N, 3, S, S] with zeros where a read failed, failures).

    With `strict=True` the first unreadable image raises `HarnessError` naming its path.
    """
    check_resize_mode(mode)
    n = len(paths)
    out = np.zeros((n, 3, size, size), dtype=np.uint8)
    failures: list[DecodeFailure] = []
    ids = list(image_ids) if image_ids is not None else list(range(n))
    workers = workers or default_workers()
    chunk = max(1, min(64, n // (workers * 4) or 1))

    def run(start: int) -> list[DecodeFailure]:
        bad: list[DecodeFailure] = []
        for i in range(start, min(n, start + chunk)):
            try:
                out[i] = decode_image(paths[i], size, mode)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                reason = one_line(exc, limit=200)
                if strict:
                    raise HarnessError(f"{paths[i]}: cannot read image ({reason})") from None
                bad.append(DecodeFailure(i, int(ids[i]), str(paths[i]), reason))
        return bad

    if progress:
        progress(description, 0, n)
    done = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="harness-decode") as pool:
        sizes: dict[Future[list[DecodeFailure]], int] = {
            pool.submit(run, s): min(chunk, n - s) for s in range(0, n, chunk)
        }
        pending = set(sizes)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
                failures.extend(fut.result())
                done += sizes.get(fut, 0)
            if progress:
                progress(description, min(done, n), n)
    failures.sort(key=lambda f: f.position)
    return out, failures


def _file_fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(b"missing;")
    return h.hexdigest()


def cache_key(split: CocoSplit, size: int, mode: str) -> str:
    """Hash of everything that changes the cached pixels of `split` at `size`/`mode`."""
    payload = {
        "version": CACHE_VERSION,
        "annotation_sha256": split.annotation_sha256,
        "image_dir": str(split.image_dir.resolve()),
        "image_ids": split.image_ids,
        "files": _file_fingerprint(split.paths),
        "size": int(size),
        "mode": mode,
        "resample": _RESAMPLE.name,
        "pad": PAD_RGB,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def entry_paths(cache_dir: Path, split: CocoSplit, size: int, mode: str, key: str) -> tuple[Path, Path]:
    stem = f"{split.split}-{size}px-{mode}-n{len(split)}-{key[:20]}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temp file in the same directory, fsync, then os.replace onto `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _clean_stale_temps(cache_dir: Path) -> None:
    now = time.time()
    for tmp in cache_dir.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                tmp.unlink()


def _try_load(npy: Path, sidecar: Path, key: str, size: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The entry if it is complete and matches `key`; None otherwise (never half-written data)."""
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            return None
        shape = (len(meta["kept"]), 3, size, size)
        if tuple(meta["shape"]) != shape or npy.stat().st_size != meta["nbytes"]:
            return None
        arr = np.load(npy, allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if arr.dtype != np.uint8 or arr.shape != shape:
        return None
    return arr, meta


def load_or_build(
    split: CocoSplit,
    size: int,
    mode: str = "squash",
    cache_dir: str | Path | None = "results/cache",
    *,
    strict: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> CachedImages:
    """The cached images of `split` at size×size, building (and storing) the entry on a miss.

    `cache_dir=None` decodes without storing anything.
    """
    check_resize_mode(mode)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise HarnessError(f"image_size = {size!r}: expected a positive number of pixels")
    t0 = time.perf_counter()
    key = cache_key(split, size, mode)
    description = f"{split.split}: {len(split)} images → {size}px {mode}"
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        npy, sidecar = entry_paths(cache_dir, split, size, mode, key)
        found = _try_load(npy, sidecar, key, size) if sidecar.is_file() else None
        if found is not None:
            arr, meta = found
            failures = [DecodeFailure(**f) for f in meta.get("failures", [])]
            if strict and failures:
                f = failures[0]
                raise HarnessError(f"{f.path}: cannot read image ({f.reason})")
            if progress:
                progress(f"{description} (cached)", len(split), len(split))
            return CachedImages(arr, np.asarray(meta["kept"], dtype=np.int64), failures, key, npy, True,
                                time.perf_counter() - t0, meta)
    else:
        npy = sidecar = None  # type: ignore[assignment]

    images, failures = decode_images(
        split.paths, size, mode, workers=workers, strict=strict, progress=progress,
        description=description, image_ids=split.image_ids,
    )
    bad = {f.position for f in failures}
    kept = np.array([i for i in range(len(split)) if i not in bad], dtype=np.int64)
    if bad:
        images = np.ascontiguousarray(images[kept])
    meta = {
        "version": CACHE_VERSION, "key": key, "split": split.split, "root": str(split.root),
        "annotation_file": str(split.annotation_file), "annotation_sha256": split.annotation_sha256,
        "size": size, "mode": mode, "shape": list(images.shape), "kept": kept.tolist(),
        "image_ids": [split.image_ids[i] for i in kept], "failures": [f.__dict__ for f in failures],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(cache_dir)
        _atomic_write(npy, lambda fh: np.save(fh, images, allow_pickle=False))
        meta["nbytes"] = npy.stat().st_size
        _atomic_write(sidecar, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    return CachedImages(images, kept, failures, key, npy if cache_dir is not None else Path(), False,
                        time.perf_counter() - t0, meta)


def warn_skipped(split: CocoSplit, failures: list[DecodeFailure]) -> None:
    """One warning that counts the unreadable images of a split (library code does not print)."""
    if failures:
        first = failures[0]
        warnings.warn(
            f"{split.split}: skipped {len(failures)} unreadable image(s) in {split.image_dir} "
            f"(first: {first.path}: {first.reason})",
            SkippedImagesWarning,
            stacklevel=3,
        )
