"""Decode-once image cache: COCO images decoded to RGB, resized to S×S, stored as uint8 [N, 3, S, S].

An entry is a plain `.npy` array plus a small `.json` sidecar under the cache dir (default
`results/cache/`), named by a hash of everything that changes its content: the annotation file's
bytes, the image folder, the image ids in order, each image file's size and mtime, the image size,
the resize mode and the decoder version. An entry is trusted only when its sidecar names the same key
and the array has the recorded shape and byte size, and it is read memory-mapped (copy-on-write), so
every process training from one entry shares its pages instead of holding a copy.

Built for full COCO (train2017 at 224 px is 17.8 GB): rows go straight from the decoding threads
into a hidden partial file with `pwrite` (the page cache holds them, not the process), which is
moved into place with `os.replace` before the sidecar is written atomically. Every
CHECKPOINT_SECONDS the build records which chunks are on disk, so a build that is killed resumes
from there; an `flock` per entry makes a second process wait for the first one's build and read it
instead of decoding the same images again. Entries are never changed in place (only replaced), so a
process that maps one keeps valid pages.

Decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing; JPEGs are
decoded at a reduced scale with `Image.draft`). Library code prints nothing: pass a `progress`
callback `(description, done, total)` to follow it; a build ends with one more call whose
description gives the images decoded and images/s. Unreadable images (missing, truncated, not an
image) are skipped and reported in `CachedImages.failures` unless `strict=True`, which raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.data.coco import CocoSplit
from harness.errors import HarnessError, HarnessWarning, one_line

try:
    import fcntl
except ImportError:  # not POSIX: no lock between builders
    fcntl = None  # type: ignore[assignment]

Progress = Callable[[str, int, int], None]
Sink = Callable[[int, np.ndarray], None]

RESIZE_MODES = ("squash", "center-crop", "letterbox")
PAD_RGB = (124, 116, 104)  # ImageNet mean: letterbox bars and transparent pixels normalise to ≈ 0
CACHE_VERSION = 1  # bump when decoding or resizing changes what is stored
_RESAMPLE = Image.Resampling.BILINEAR  # antialiased when downscaling
_STALE_TEMP_SECONDS = 3600.0
_STALE_PARTIAL_SECONDS = 7 * 86400.0
_MAX_CHUNK = 64
CHECKPOINT_SECONDS = 5.0  # how often a build records its resume point


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


def chunk_size(n: int) -> int:
    """Images per decode task: a function of the count alone, so a resumed build lines up with the killed one."""
    return max(1, min(_MAX_CHUNK, n // 64))


def _decode_chunk(paths: Sequence[str | Path], ids: Sequence[int], start: int, stop: int, size: int, mode: str,
                  strict: bool) -> tuple[np.ndarray, list[DecodeFailure]]:
    buf = np.zeros((stop - start, 3, size, size), dtype=np.uint8)
    bad: list[DecodeFailure] = []
    for i in range(start, stop):
        try:
            buf[i - start] = decode_image(paths[i], size, mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = one_line(exc, limit=200)
            if strict:
                raise HarnessError(f"{paths[i]}: cannot read image ({reason})") from None
            bad.append(DecodeFailure(i, int(ids[i]), str(paths[i]), reason))
    return buf, bad


@dataclass
class _Resume:
    """Chunks (by first position) already decoded into a partial entry, and the failures among them."""

    done: list[int] = field(default_factory=list)
    failures: list[DecodeFailure] = field(default_factory=list)


def _decode_into(
    paths: Sequence[str | Path], size: int, mode: str, sink: Sink, *, workers: int | None, strict: bool,
    progress: Progress | None, description: str, ids: Sequence[int], resume: _Resume | None = None,
    checkpoint: Callable[[_Resume], None] | None = None,
) -> tuple[list[DecodeFailure], int]:
    """Decode the chunks not in `resume` in a thread pool, handing each to `sink(first_row, rows)`.

    Returns (failures, images decoded now). `checkpoint(state)` runs in this thread every
    CHECKPOINT_SECONDS with the chunks whose rows the sink has written.
    """
    n = len(paths)
    chunk = chunk_size(n)
    state = _Resume(list(resume.done), list(resume.failures)) if resume else _Resume()
    skip = set(state.done)
    todo = [s for s in range(0, n, chunk) if s not in skip]
    done = n - sum(min(chunk, n - s) for s in todo)
    already = done

    def run(start: int) -> list[DecodeFailure]:
        rows, bad = _decode_chunk(paths, ids, start, min(n, start + chunk), size, mode, strict)
        sink(start, rows)
        return bad

    if progress:
        progress(description, done, n)
    last = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="harness-decode")
    try:
        futures: dict[Future[list[DecodeFailure]], int] = {pool.submit(run, s): s for s in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                error = fut.exception()
                if error is not None:
                    raise error
                state.failures.extend(fut.result())
                state.done.append(futures[fut])
                done += min(chunk, n - futures[fut])
            if checkpoint and pending and time.perf_counter() - last >= CHECKPOINT_SECONDS:
                checkpoint(state)
                last = time.perf_counter()
            if progress:
                progress(description, done, n)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    state.failures.sort(key=lambda f: f.position)
    return state.failures, done - already


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
    out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)

    def sink(start: int, rows: np.ndarray) -> None:
        out[start:start + len(rows)] = rows

    ids = list(image_ids) if image_ids is not None else list(range(len(paths)))
    failures, _ = _decode_into(paths, size, mode, sink, workers=workers, strict=strict, progress=progress,
                               description=description, ids=ids)
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
    """Drop temp files older than an hour and partial builds nobody resumed for a week."""
    now = time.time()
    for pattern, age in ((".*.tmp", _STALE_TEMP_SECONDS), (".*.partial*", _STALE_PARTIAL_SECONDS)):
        for tmp in cache_dir.glob(pattern):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > age:
                    tmp.unlink()


def _map(npy: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The array of a .npy file, memory-mapped copy-on-write: processes reading one entry share its pages,
    and an in-place op on the array changes this process's copy only, never the file."""
    if shape[0] == 0:
        return np.load(npy, allow_pickle=False)
    return np.load(npy, mmap_mode="c", allow_pickle=False)


def _try_load(npy: Path, sidecar: Path, key: str, size: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The entry if it is complete and matches `key`; None otherwise (never half-written data)."""
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            return None
        shape = (len(meta["kept"]), 3, size, size)
        if tuple(meta["shape"]) != shape or npy.stat().st_size != meta["nbytes"]:
            return None
        arr = _map(npy, shape)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    if arr.dtype != np.uint8 or arr.shape != shape:
        return None
    return arr, meta


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _open_partial(partial: Path, state_file: Path, key: str, shape: tuple[int, ...]) -> tuple[int, int, _Resume]:
    """Open (fd, header length, resume state) of a partial entry: the one a killed build left for the same
    key and shape, else a fresh sparse file of the final size."""
    header = _npy_header(shape)
    nbytes = len(header) + int(np.prod(shape))
    try:
        state = json.loads(state_file.read_text())
        if (state["key"] == key and tuple(state["shape"]) == shape and state["chunk"] == chunk_size(shape[0])
                and partial.stat().st_size == nbytes):
            fd = os.open(partial, os.O_RDWR)
            failures = [DecodeFailure(**f) for f in state["failures"]]
            return fd, len(header), _Resume([int(s) for s in state["done"]], failures)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with contextlib.suppress(OSError):
        state_file.unlink()
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, header)
    os.ftruncate(fd, nbytes)
    return fd, len(header), _Resume()


def _compact(partial: Path, npy: Path, kept: np.ndarray) -> None:
    """Write the rows `kept` of the partial array to `npy` (atomically), in bounded memory."""
    source = np.load(partial, mmap_mode="r", allow_pickle=False)
    shape = (len(kept), *source.shape[1:])
    header = _npy_header(shape)

    def write(fh: Any) -> None:
        fh.write(header)
        for start in range(0, len(kept), 1024):
            fh.write(np.ascontiguousarray(source[kept[start:start + 1024]]).tobytes())

    _atomic_write(npy, write)
    partial.unlink()


@contextlib.contextmanager
def _entry_lock(lock_file: Path, progress: Progress | None, description: str, total: int) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_file`, so that one process (or thread) builds an entry and the
    others wait for it and then read it. No lock where `fcntl` is missing."""
    if fcntl is None:
        yield
        return
    with open(lock_file, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting = f"{description} (waiting for another process building it)"
            if progress:
                progress(waiting, 0, total)
            fcntl.flock(fh, fcntl.LOCK_EX)
            if progress:
                progress(waiting, total, total)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_entry(split: CocoSplit, size: int, mode: str, npy: Path, sidecar: Path, key: str, meta: dict[str, Any],
                 *, strict: bool, workers: int | None, progress: Progress | None, description: str) -> None:
    """Decode `split` into a partial file beside `npy`, resuming a killed build of the same key, then move it
    into place and write the sidecar (last)."""
    started = time.perf_counter()
    shape = (len(split), 3, size, size)
    partial = npy.with_name(f".{npy.name}.partial")
    state_file = npy.with_name(f".{npy.name}.partial-state")
    fd, offset, resume = _open_partial(partial, state_file, key, shape)
    row = 3 * size * size

    def sink(start: int, rows: np.ndarray) -> None:
        os.pwrite(fd, rows.tobytes(), offset + start * row)  # the page cache holds them, not this process

    def checkpoint(state: _Resume) -> None:
        os.fdatasync(fd)  # the rows first, then the record that they are there
        record = {"key": key, "shape": list(shape), "chunk": chunk_size(len(split)), "done": sorted(state.done),
                  "failures": [f.__dict__ for f in state.failures]}
        _atomic_write(state_file, lambda fh: fh.write(json.dumps(record).encode()))

    try:
        failures, decoded = _decode_into(
            split.paths, size, mode, sink, workers=workers, strict=strict, progress=progress,
            description=description, ids=split.image_ids, resume=resume, checkpoint=checkpoint,
        )
        os.fsync(fd)
    finally:
        os.close(fd)
    bad = {f.position for f in failures}
    kept = np.array([i for i in range(len(split)) if i not in bad], dtype=np.int64)
    if bad:
        _compact(partial, npy, kept)
    else:
        os.replace(partial, npy)
    _report_rate(progress, description, decoded, time.perf_counter() - started, meta)
    meta.update(shape=[len(kept), 3, size, size], kept=kept.tolist(), nbytes=npy.stat().st_size,
                image_ids=[split.image_ids[i] for i in kept], failures=[f.__dict__ for f in failures])
    _atomic_write(sidecar, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    with contextlib.suppress(OSError):
        state_file.unlink()


def _stored(found: tuple[np.ndarray, dict[str, Any]], key: str, npy: Path, strict: bool, seconds: float,
            hit: bool) -> CachedImages:
    """A stored entry as `CachedImages`; with `strict`, its first unreadable image is an error (also when a
    strict build resumed a lenient one that had skipped it)."""
    arr, meta = found
    failures = [DecodeFailure(**f) for f in meta.get("failures", [])]
    if strict and failures:
        f = failures[0]
        raise HarnessError(f"{f.path}: cannot read image ({f.reason})")
    return CachedImages(arr, np.asarray(meta["kept"], dtype=np.int64), failures, key, npy, hit, seconds, meta)


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

    `cache_dir=None` decodes into memory without storing anything. A stored entry comes back
    memory-mapped (see `_map`). One process builds a missing entry; others wait for it and read it.
    """
    check_resize_mode(mode)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise HarnessError(f"image_size = {size!r}: expected a positive number of pixels")
    t0 = time.perf_counter()
    key = cache_key(split, size, mode)
    description = f"{split.split}: {len(split)} images → {size}px {mode}"
    meta: dict[str, Any] = {
        "version": CACHE_VERSION, "key": key, "split": split.split, "root": str(split.root),
        "annotation_file": str(split.annotation_file), "annotation_sha256": split.annotation_sha256,
        "size": size, "mode": mode, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cache_dir is None:
        images, failures = decode_images(split.paths, size, mode, workers=workers, strict=strict,
                                         progress=progress, description=description, image_ids=split.image_ids)
        kept = np.array(sorted(set(range(len(split))) - {f.position for f in failures}), dtype=np.int64)
        if failures:
            images = np.ascontiguousarray(images[kept])
        _report_rate(progress, description, len(split), time.perf_counter() - t0, meta)
        return CachedImages(images, kept, failures, key, Path(), False, time.perf_counter() - t0, meta)
    cache_dir = Path(cache_dir)
    npy, sidecar = entry_paths(cache_dir, split, size, mode, key)
    found = _try_load(npy, sidecar, key, size) if sidecar.is_file() else None
    if found is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _entry_lock(npy.with_name(f".{npy.stem}.lock"), progress, description, len(split)):
            found = _try_load(npy, sidecar, key, size) if sidecar.is_file() else None  # built while we waited?
            if found is None:
                _clean_stale_temps(cache_dir)
                _build_entry(split, size, mode, npy, sidecar, key, meta, strict=strict, workers=workers,
                             progress=progress, description=description)
                built = _try_load(npy, sidecar, key, size)
                if built is None:
                    raise HarnessError(f"{npy}: the cache entry just written cannot be read back")
                return _stored((built[0], meta), key, npy, strict, time.perf_counter() - t0, hit=False)
    if progress:
        progress(f"{description} (cached)", len(split), len(split))
    return _stored(found, key, npy, strict, time.perf_counter() - t0, hit=True)


def _report_rate(progress: Progress | None, description: str, decoded: int, seconds: float,
                 meta: dict[str, Any]) -> None:
    """Record (and, through `progress`, show) how fast this build decoded."""
    rate = decoded / seconds if seconds > 0 else 0.0
    meta.update(decoded=decoded, build_seconds=round(seconds, 3), images_per_s=round(rate, 1))
    if progress:
        progress(f"{description}: {decoded} decoded in {seconds:.1f} s, {rate:,.0f} images/s", decoded, decoded)


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
