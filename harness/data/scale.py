"""`harness bench data`: how long building the decode-once cache of full COCO takes, and what it costs.

A COCO-layout train2017 of N JPEGs (COCO's typical 640×480 by default) is generated in a temporary
directory: a few hundred distinct photo-like images, encoded once, the rest hard links to them (so
generating 20,000 images takes seconds and no disk). Each image size is then built into a fresh cache
by its own subprocess (so that peak memory is that build's), and the images/s measured there are
projected to train2017's 118,287 images. Decoding dominates; reading 18 GB of real JPEGs from disk
adds its own time (the links here are read from the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from harness.data.cache import load_or_build
from harness.data.coco import load_split
from harness.errors import HarnessError

TRAIN2017_IMAGES = 118_287
DEFAULT_SIZES = (64, 128, 224)


@dataclass
class BuildFigures:
    """One cache build: throughput, memory and disk, and what that means for train2017."""

    size: int
    images: int
    seconds: float
    images_per_s: float
    rss_before_mb: float
    build_peak_rss_mb: float
    process_peak_rss_mb: float
    entry_bytes: int
    reload_s: float
    train2017_minutes: float
    train2017_gb: float


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with shapes and sensor-like noise: compresses and decodes like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 128 + 80 * np.sin(x * fx + y * fy + phase)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 160)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_jpeg_coco(root: Path, n_images: int, width: int = 640, height: int = 480, distinct: int = 256,
                   seed: int = 0) -> Path:
    """Write `root/train2017/*.jpg` (N files, `distinct` different ones, the rest hard links) and its
    instances JSON with one box per image."""
    if n_images < 1 or distinct < 1 or width < 8 or height < 8:
        raise HarnessError(f"--images {n_images}, {width}×{height}: need at least 1 image of at least 8×8 px")
    images_dir, annotations = root / "train2017", root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = []
    for i in range(min(distinct, n_images)):
        source = images_dir / f"{i + 1:012d}.jpg"
        _photo(rng, width, height).save(source, quality=90)
        sources.append(source)
    for i in range(len(sources), n_images):
        target = images_dir / f"{i + 1:012d}.jpg"
        try:
            os.link(sources[i % len(sources)], target)
        except OSError:  # no hard links here: copy
            shutil.copyfile(sources[i % len(sources)], target)
    records = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": width, "height": height}
               for i in range(n_images)]
    boxes = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 3, "bbox": [8, 8, width / 3, height / 3],
              "area": width * height / 9, "iscrowd": 0} for i in range(n_images)]
    categories = [{"id": c, "name": name, "supercategory": "thing"} for c, name in ((1, "a"), (2, "b"), (3, "c"))]
    (annotations / "instances_train2017.json").write_text(json.dumps(
        {"info": {"description": "harness bench data"}, "images": records, "annotations": boxes,
         "categories": categories}))
    return root


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_once(root: Path, cache_dir: Path, size: int, workers: int | None) -> dict[str, float]:
    """Build one cache entry in this process; its time, images/s and RSS (meant for a fresh process).

    RSS is sampled every 20 ms during the build (`build_peak_rss_mb`); `process_peak_rss_mb` is the
    whole process's high-water mark, imports included.
    """
    split = load_split(root, "train2017")
    before = _rss_mb()
    samples = [before]
    building = threading.Event()
    building.set()

    def sample() -> None:
        while building.is_set():
            samples.append(_rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        built = load_or_build(split, size, "squash", cache_dir, workers=workers)
    finally:
        building.clear()
        sampler.join()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    started = time.perf_counter()
    again = load_or_build(split, size, "squash", cache_dir)
    reload_s = time.perf_counter() - started
    if not again.hit:
        raise HarnessError(f"{cache_dir}: the entry just built was not found again")
    return {"images": len(split), "seconds": seconds, "images_per_s": len(split) / seconds, "rss_before_mb": before,
            "build_peak_rss_mb": max(samples), "process_peak_rss_mb": peak, "entry_bytes": built.path.stat().st_size,
            "reload_s": reload_s}


def bench_data(n_images: int = 20_000, sizes: Sequence[int] = DEFAULT_SIZES, width: int = 640, height: int = 480,
               workers: int | None = None, work: Path | None = None,
               progress: Callable[[str], None] | None = None) -> list[BuildFigures]:
    """Generate the images, then build each size's cache in a subprocess; figures per size."""
    if not sizes or any(s < 1 for s in sizes):
        raise HarnessError(f"--size {list(sizes)}: give positive image sizes")
    owned = work is None
    base = Path(tempfile.mkdtemp(prefix="harness-bench-data-")) if work is None else Path(work)
    try:
        if progress:
            progress(f"generating {n_images} JPEGs ({width}×{height}) in {base}")
        root = make_jpeg_coco(base / "coco", n_images, width, height)
        rows = []
        for size in sizes:
            if progress:
                progress(f"building the {size} px cache of {n_images} images")
            command = [sys.executable, "-m", "harness.data.scale", str(root), str(base / f"cache-{size}"), str(size)]
            if workers:
                command.append(str(workers))
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise HarnessError(f"the {size} px build failed: {done.stderr.strip().splitlines()[-1:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(base / f"cache-{size}", ignore_errors=True)
            rows.append(BuildFigures(
                size=size, **figures,
                train2017_minutes=TRAIN2017_IMAGES / figures["images_per_s"] / 60,
                train2017_gb=(TRAIN2017_IMAGES * 3 * size * size + 128) / 1e9,
            ))
        return rows
    finally:
        if owned:
            shutil.rmtree(base, ignore_errors=True)


def figures_json(rows: list[BuildFigures]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


if __name__ == "__main__":  # one build, in the fresh process that bench_data starts
    parser = argparse.ArgumentParser()
    for name in ("root", "cache_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("size", type=int)
    parser.add_argument("workers", type=int, nargs="?")
    a = parser.parse_args()
    print(json.dumps(build_once(a.root, a.cache_dir, a.size, a.workers)))
