"""Decoding (modes, resize), the decode-once cache (hit, miss, rebuild, atomicity) and unreadable images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import (
    PAD_RGB,
    SkippedImagesWarning,
    decode_image,
    load_or_build,
    load_split,
    prepare_data,
    transform_boxes,
)
from harness.data import cache as cache_mod
from harness.errors import HarnessError

GREEN, RED, BLUE = (0, 255, 0), (255, 0, 0), (0, 0, 255)


def _bands(path: Path) -> Path:
    """120×60 image: columns 0-29 green, 30-89 red, 90-119 blue."""
    arr = np.zeros((60, 120, 3), np.uint8)
    arr[:, :30], arr[:, 30:90], arr[:, 90:] = GREEN, RED, BLUE
    Image.fromarray(arr).save(path)
    return path


def _px(out: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in out[:, y, x])


def test_resize_modes(tmp_path: Path) -> None:
    path = _bands(tmp_path / "bands.png")
    squash = decode_image(path, 32, "squash")
    assert squash.shape == (3, 32, 32) and squash.dtype == np.uint8
    assert _px(squash, 16, 2) == GREEN and _px(squash, 16, 16) == RED and _px(squash, 16, 30) == BLUE
    crop = decode_image(path, 32, "center-crop")
    assert all(_px(crop, y, x) == RED for y in (0, 16, 31) for x in (0, 16, 31))
    box = decode_image(path, 32, "letterbox")
    assert _px(box, 2, 16) == PAD_RGB and _px(box, 29, 16) == PAD_RGB  # bars above and below
    assert _px(box, 16, 1) == GREEN and _px(box, 16, 16) == RED and _px(box, 16, 30) == BLUE


def test_image_modes(tmp_path: Path) -> None:
    gray = tmp_path / "gray.jpg"
    Image.new("L", (40, 30), 200).save(gray)
    out = decode_image(gray, 16)
    assert out.shape == (3, 16, 16) and np.ptp(out[:, 8, 8]) == 0 and abs(int(out[0, 8, 8]) - 200) <= 2

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cmyk)  # red in CMYK
    out = decode_image(cmyk, 16)
    assert out[0, 8, 8] > 200 and out[1, 8, 8] < 60 and out[2, 8, 8] < 60

    rgba = tmp_path / "rgba.png"
    arr = np.zeros((20, 20, 4), np.uint8)
    arr[:, :10] = (10, 20, 30, 255)  # left opaque, right fully transparent
    Image.fromarray(arr, "RGBA").save(rgba)
    out = decode_image(rgba, 20)
    assert _px(out, 10, 2) == (10, 20, 30) and _px(out, 10, 17) == PAD_RGB

    pal = tmp_path / "pal.png"
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 250, 5, 5] + [0] * 762)
    p.save(pal)
    assert _px(decode_image(pal, 8), 4, 4) == (250, 5, 5)

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((10, 10), 65535, np.uint16)).save(deep)
    assert _px(decode_image(deep, 8), 4, 4) == (255, 255, 255)

    bw = tmp_path / "bw.png"
    Image.new("1", (10, 10), 1).save(bw)
    assert _px(decode_image(bw, 8), 4, 4) == (255, 255, 255)


def test_transform_boxes() -> None:
    b = np.array([[10, 5, 20, 10]], np.float32)
    assert transform_boxes(b, 100, 50, 10, "squash").tolist() == [[1, 1, 3, 3]]
    # center-crop keeps columns 25..75 of the 100×50 image
    assert np.allclose(transform_boxes(b, 100, 50, 10, "center-crop"), [[0, 1, 1, 3]])
    # letterbox: scale 0.1, content rows 2.5→ offset (10-5)//2 = 2
    assert np.allclose(transform_boxes(b, 100, 50, 10, "letterbox"), [[1, 2.5, 3, 3.5]])


def test_cache_hit_miss_and_rebuild_on_annotation_change(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    shutil.copytree(synth_root, root)
    cache = tmp_path / "cache"
    kw = dict(train_size=20, val_size=10, image_size=16, cache_dir=cache)
    first = prepare_data(root, **kw)
    assert not first.cache["train"]["hit"] and not first.cache["val"]["hit"]
    second = prepare_data(root, **kw)
    assert second.cache["train"]["hit"] and second.cache["val"]["hit"]
    assert np.array_equal(first.train_images.numpy(), second.train_images.numpy())
    assert np.array_equal(first.val_targets.numpy(), second.val_targets.numpy())
    assert len(list(cache.glob("*.npy"))) == 2 and len(list(cache.glob("*.json"))) == 2
    assert not list(cache.glob(".*.tmp"))

    ann = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["info"]["description"] += " (edited)"
    ann.write_text(json.dumps(data))
    third = prepare_data(root, **kw)
    assert not third.cache["train"]["hit"] and third.cache["val"]["hit"]
    assert third.cache["train"]["path"] != first.cache["train"]["path"]

    # a different size or resize mode is a different entry
    assert not prepare_data(root, **{**kw, "image_size": 12}).cache["val"]["hit"]
    fourth = prepare_data(root, **{**kw, "resize": "letterbox"})
    assert not fourth.cache["val"]["hit"]

    # replacing an image file (new size/mtime) rebuilds too
    img = root / "val2017" / f"{first.val_ids[0]:012d}.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(img)
    os.utime(img, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert not prepare_data(root, **kw).cache["val"]["hit"]


def _entry(cache: Path) -> tuple[Path, Path]:
    (npy,) = cache.glob("*.npy")
    return npy, npy.with_suffix(".json")


def test_half_written_entries_are_not_trusted(synth_root: Path, tmp_path: Path) -> None:
    split = load_split(synth_root, "val2017").subset(range(12))
    cache = tmp_path / "cache"
    good = np.array(load_or_build(split, 16, "squash", cache).images)  # in memory: the test rewrites the file
    npy, sidecar = _entry(cache)

    # killed between writing the array and the sidecar: garbage array, no sidecar, a leftover temp file
    sidecar.unlink()
    npy.write_bytes(b"\x93NUMPY garbage")
    (cache / f".{npy.name}.abc123.tmp").write_bytes(os.urandom(100))
    again = load_or_build(split, 16, "squash", cache)
    assert not again.hit and np.array_equal(again.images, good)

    # sidecar present but the array truncated (or replaced by something else)
    del again  # (it maps the file that is truncated in place next)
    npy.write_bytes(npy.read_bytes()[:-50])
    third = load_or_build(split, 16, "squash", cache)
    assert not third.hit and np.array_equal(third.images, good)
    assert load_or_build(split, 16, "squash", cache).hit

    # a sidecar with another key (a different entry's) is not trusted either
    meta = json.loads(sidecar.read_text())
    meta["key"] = "0" * 64
    sidecar.write_text(json.dumps(meta))
    assert not load_or_build(split, 16, "squash", cache).hit


def test_interrupted_build_is_resumed(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = load_split(synth_root, "train2017")  # 64 images: one per chunk
    reference, _ = cache_mod.decode_images(split.paths, 16)
    cache = tmp_path / "cache"
    monkeypatch.setattr(cache_mod, "CHECKPOINT_SECONDS", 0.0)
    decode = cache_mod.decode_image

    def slow_decode(*args: object, **kwargs: object) -> np.ndarray:  # one chunk at a time reaches the loop
        time.sleep(0.01)
        return decode(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "decode_image", slow_decode)
    calls: list[int] = []

    def interrupt(description: str, done: int, total: int) -> None:
        calls.append(done)
        if done >= total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_or_build(split, 16, "squash", cache, progress=interrupt, workers=1)
    assert not list(cache.glob("*.npy")) and not list(cache.glob("*.json")), "nothing trusted"
    monkeypatch.setattr(cache_mod, "decode_image", decode)
    resumed: list[tuple[str, int, int]] = []
    again = load_or_build(split, 16, "squash", cache, progress=lambda *a: resumed.append(a))
    assert not again.hit and np.array_equal(again.images, reference)
    # every progress call but the last came after a checkpoint (the decode threads may finish many chunks
    # between two calls, so how far the killed build got varies)
    checkpointed = calls[-2]
    assert checkpointed >= 1 and resumed[0][1] >= checkpointed, f"the build went on from its checkpoint: {calls}"
    assert again.meta["decoded"] == 64 - resumed[0][1] and "images/s" in resumed[-1][0]
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [f".{_entry(cache)[0].stem}.lock"]
    assert load_or_build(split, 16, "squash", cache).hit


BUILDER = """
import json, os, signal, sys, time
from pathlib import Path
from harness.data import cache, load_split

root, out, ready, kill_at, hold = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
cache.CHECKPOINT_SECONDS = 0.0
decode = cache.decode_image
def slow_decode(*args, **kwargs):  # chunks reach the build loop one at a time, so checkpoints keep up
    time.sleep(0.02)
    return decode(*args, **kwargs)
if kill_at:
    cache.decode_image = slow_decode
split = load_split(root, "train2017")
seen = []
def progress(description, done, total):
    seen.append(description)
    if kill_at and done >= kill_at * total:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-build, no cleanup of any kind
    time.sleep(hold)
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < int(sys.argv[6]):  # start together
    time.sleep(0.01)
start = time.time()
got = cache.load_or_build(split, 16, "squash", out, progress=progress, workers=1)
print(json.dumps({"hit": got.hit, "start": start, "end": time.time(), "waited": any("waiting" in d for d in seen)}))
"""


def _builders(root: Path, cache: Path, tmp: Path, count: int, kill_at: float = 0.0, hold: float = 0.0):
    ready = tmp / f"ready-{count}-{kill_at}"
    ready.mkdir()
    args = [str(root), str(cache), str(ready), str(kill_at), str(hold), str(count)]
    return [subprocess.Popen([sys.executable, "-c", BUILDER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(count)]


def test_killed_build_resumes_and_concurrent_builders_decode_once(synth_root: Path, tmp_path: Path) -> None:
    split = load_split(synth_root, "train2017")
    reference, _ = cache_mod.decode_images(split.paths, 16)
    cache = tmp_path / "cache"
    (killed,) = _builders(synth_root, cache, tmp_path, 1, kill_at=0.5)
    assert killed.wait(timeout=120) == -signal.SIGKILL, killed.communicate()
    assert not list(cache.glob("*.npy")) and not list(cache.glob("*.json")), "nothing trusted"

    pair = _builders(synth_root, cache, tmp_path, 2, hold=0.02)
    results = []
    for proc in pair:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.splitlines()[-1]))
    builder, waiter = sorted(results, key=lambda r: r["hit"])
    assert (builder["hit"], waiter["hit"]) == (False, True), "one process decoded, the other read its entry"
    assert waiter["waited"] and waiter["start"] < builder["end"], "they overlapped"
    entry = load_or_build(split, 16, "squash", cache)
    assert entry.hit and np.array_equal(entry.images, reference)
    # killed at half way; its last checkpoint is a chunk or a few behind the kill (decoding runs on while
    # the build loop syncs the file), so well under all 64 are decoded again
    assert entry.meta["decoded"] <= 48, "the build resumed from the killed one's checkpoint"


def test_entries_are_mapped_copy_on_write(synth_root: Path, tmp_path: Path) -> None:
    split = load_split(synth_root, "val2017")
    cache = tmp_path / "cache"
    load_or_build(split, 16, "squash", cache)
    hit = load_or_build(split, 16, "squash", cache)
    assert isinstance(hit.images, np.memmap) and hit.images.flags.writeable
    before = np.load(hit.path).copy()
    tensor = torch.from_numpy(hit.images)
    tensor += 1  # an in-place op changes this process's pages only
    assert np.array_equal(np.load(hit.path), before)
    assert np.array_equal(load_or_build(split, 16, "squash", cache).images, before)


def test_stale_temp_files_are_cleaned(synth_root: Path, tmp_path: Path) -> None:
    split = load_split(synth_root, "val2017").subset(range(4))
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh = cache / ".x.npy.old.tmp", cache / ".x.npy.new.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    load_or_build(split, 16, "squash", cache)
    assert not stale.exists() and fresh.exists()


def _bad_images_root(tmp_path: Path, make_coco) -> Path:
    imgs = [{"id": i, "width": 12, "height": 10} for i in range(1, 7)]
    imgs[3]["write"] = False  # id 4: missing file
    anns = [{"image_id": i, "category_id": (1, 3, 7)[i % 3]} for i in range(1, 7)]
    root = make_coco(tmp_path / "coco", imgs, anns, split="train2017")
    make_coco(root, [{"id": 50, "width": 8, "height": 8}], [{"image_id": 50, "category_id": 1}], split="val2017")
    good = (root / "train2017" / "000000000002.png").read_bytes()
    (root / "train2017" / "000000000002.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "train2017" / "000000000005.png").write_text("not an image")
    return root


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, make_coco) -> None:
    root = _bad_images_root(tmp_path, make_coco)
    for attempt in range(2):  # built, then from the cache: the count is reported both times
        with pytest.warns(SkippedImagesWarning, match="skipped 3 unreadable"):
            data = prepare_data(root, image_size=8, cache_dir=tmp_path / "cache")
        assert data.cache["train"]["hit"] == bool(attempt)
        assert data.skipped == 3 and len(data.failures) == 3
        assert data.train_ids == [1, 3, 6]
        assert data.train_images.shape == (3, 3, 8, 8)
        # targets stay lined up with the images that were kept: id i has category (1, 3, 7)[i % 3]
        assert data.train_targets.argmax(1).tolist() == [[0, 1, 2][i % 3] for i in (1, 3, 6)]
        assert {Path(f.path).name for f in data.failures} == {f"{i:012d}.png" for i in (2, 4, 5)}


def test_unreadable_image_is_fatal_when_strict(tmp_path: Path, make_coco) -> None:
    root = _bad_images_root(tmp_path, make_coco)
    with pytest.raises(HarnessError, match=r"train2017/00000000000[245]\.png"):
        prepare_data(root, image_size=8, cache_dir=tmp_path / "cache", strict_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_data(root, image_size=8, cache_dir=tmp_path / "cache")
    with pytest.raises(HarnessError, match=r"\.png: cannot read image"):  # also from a cached entry
        prepare_data(root, image_size=8, cache_dir=tmp_path / "cache", strict_images=True)


def test_bad_options(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="resize"):
        prepare_data(synth_root, resize="stretch", cache_dir=tmp_path)
    with pytest.raises(HarnessError, match="image_size"):
        prepare_data(synth_root, image_size=0, cache_dir=tmp_path)


def test_coco_mini_prepare(coco_mini_root: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    data = prepare_data(coco_mini_root, train_size=24, val_size=12, image_size=32, resize="center-crop",
                        cache_dir=tmp_path, workers=2, progress=lambda *a: calls.append(a))
    assert data.num_classes == 80 and data.skipped == 0
    assert data.train_images.shape == (24, 3, 32, 32) and data.val_images.shape == (12, 3, 32, 32)
    assert data.train_targets.dtype.is_floating_point and data.train_targets.shape == (24, 80)
    assert data.categories[0] == {"id": 1, "name": "person", "index": 0}
    full = load_split(coco_mini_root, "train2017")
    rows = [full.image_ids.index(i) for i in data.train_ids]
    assert np.array_equal(data.train_targets.numpy(), full.targets[rows])
    assert float(data.train_images.float().std()) > 20  # real pixels, not zeros
    assert calls and calls[-1][1] == calls[-1][2] == 12
    for boxes, labels in data.boxes("val"):
        assert boxes.shape == (len(labels), 4) and (boxes >= 0).all() and (boxes <= 32).all()


def test_bench_data_builds_generated_jpegs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/scaling.md's `harness bench data`, small: generated COCO-layout JPEGs, one build per size."""
    from harness.cli import main

    args = ["bench", "data", "--images", "300", "--size", "16", "--source-size", "64x48", "--workers", "1",
            "--work", str(tmp_path), "--json"]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["size"] == 16 and row["images"] == 300 and row["images_per_s"] > 0
    assert row["entry_bytes"] == 300 * 3 * 16 * 16 + 128 and row["build_peak_rss_mb"] >= row["rss_before_mb"] > 0
    assert abs(row["train2017_gb"] - 118_287 * 3 * 16 * 16 / 1e9) < 1e-3
    assert len(list((tmp_path / "coco" / "train2017").iterdir())) == 300
    assert main(["bench", "data", "--source-size", "big"]) == 2
