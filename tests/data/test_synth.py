"""The synthetic shapes dataset: COCO format, determinism by seed, multi-label, boxes, clutter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import SHAPES, load_split, render_chunk, synthesize
from harness.errors import HarnessError


def _pixels(root: Path, split: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((root / split).iterdir())])


def test_layout_and_instances_json(synth_root: Path) -> None:
    for split, n in (("train2017", 64), ("val2017", 32)):
        data = json.loads((synth_root / "annotations" / f"instances_{split}.json").read_text())
        assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
        assert [c["id"] for c in data["categories"]] == list(range(1, 9))
        assert [c["name"] for c in data["categories"]] == list(SHAPES)
        assert len(data["images"]) == n == len(list((synth_root / split).glob("*.png")))
        for a in data["annotations"]:
            assert set(a) >= {"id", "image_id", "bbox", "area", "category_id", "iscrowd"}
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= 32 and y + h <= 32
            assert 4 <= a["area"] <= w * h
        ids = [i["id"] for i in data["images"]]
        assert len(set(ids)) == n
    ids_of = [
        {i["id"] for i in json.loads((synth_root / f"annotations/instances_{s}.json").read_text())["images"]}
        for s in ("train2017", "val2017")
    ]
    assert not ids_of[0] & ids_of[1]


def test_multilabel_and_all_classes(synth_root: Path) -> None:
    split = load_split(synth_root, "train2017")
    per_image = split.targets.sum(1)
    assert (per_image >= 1).all()
    assert (per_image >= 2).mean() > 0.3  # most images carry several labels
    assert (split.targets.sum(0) > 0).all()  # every class appears


def test_deterministic_by_seed(tmp_path: Path, synth_root: Path) -> None:
    again = synthesize(tmp_path / "again", n_train=64, n_val=32, size=32, seed=0, workers=1)
    assert again.n_train == 64
    for split in ("train2017", "val2017"):
        a = json.loads((synth_root / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((tmp_path / "again" / "annotations" / f"instances_{split}.json").read_text())
        assert a["annotations"] == b["annotations"] and a["images"] == b["images"]
        assert np.array_equal(_pixels(synth_root, split), _pixels(tmp_path / "again", split))
    other = synthesize(tmp_path / "other", n_train=64, n_val=0, size=32, seed=1)
    assert other.n_val == 0
    assert not np.array_equal(_pixels(synth_root, "train2017"), _pixels(tmp_path / "other", "train2017"))


def test_prefix_stable_across_sizes(tmp_path: Path) -> None:
    """Each chunk of 128 images draws from its own generator, seeded by (seed, split, chunk): a dataset of
    another size (drawn by another number of workers, with another val size) starts with the same whole
    chunks, pixel for pixel and annotation for annotation. A partial last chunk is not a prefix."""
    small, large = tmp_path / "small", tmp_path / "large"
    synthesize(small, n_train=130, n_val=8, size=16, seed=5, workers=1)
    synthesize(large, n_train=300, n_val=16, size=16, seed=5, workers=2)
    a, b = _pixels(small, "train2017"), _pixels(large, "train2017")
    assert a.shape[0] == 130 and b.shape[0] == 300
    assert np.array_equal(a[:128], b[:128])

    def annotations(root: Path, last_id: int) -> list[dict]:
        data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
        return [a for a in data["annotations"] if a["image_id"] <= last_id]

    assert annotations(small, 128) and annotations(small, 128) == annotations(large, 128)
    assert not np.array_equal(b[:128], b[128:256])  # chunk 1 is drawn afresh, not a repeat of chunk 0


def test_colour_does_not_tell_the_class() -> None:
    """Mean object colour per class is about the same: the class has to come from the shape."""
    pixels, anns = render_chunk(0, 0, 0, 128, 48, 8)
    colours: dict[int, list[np.ndarray]] = {}
    for img, image_anns in zip(pixels, anns, strict=True):
        for a in image_anns:
            x, y, w, h = (int(v) for v in a["bbox"])
            cy, cx = y + h // 2, x + w // 2
            colours.setdefault(a["category"], []).append(img[cy, cx].astype(float))
    means = np.array([np.mean(colours[c], axis=0) for c in sorted(colours)])
    assert len(means) == 8
    assert np.ptp(means, axis=0).max() < 80  # spread of per-class means ≪ the 0..255 range


def test_objects_vary_in_scale() -> None:
    _, anns = render_chunk(0, 0, 0, 128, 64, 8)
    sides = [max(a["bbox"][2], a["bbox"][3]) for image_anns in anns for a in image_anns]
    assert min(sides) <= 14 and max(sides) >= 40


def test_refuses_to_overwrite_and_checks_arguments(tmp_path: Path) -> None:
    synthesize(tmp_path / "d", n_train=4, n_val=2, size=16, seed=0)
    with pytest.raises(HarnessError, match="instances_train2017.json"):
        synthesize(tmp_path / "d", n_train=4, n_val=2, size=16)
    synthesize(tmp_path / "d", n_train=4, n_val=2, size=16, overwrite=True, image_format="jpg")
    assert sorted(p.suffix for p in (tmp_path / "d" / "train2017").iterdir()) == [".jpg"] * 4
    with pytest.raises(HarnessError, match="num_classes"):
        synthesize(tmp_path / "e", num_classes=9)
    with pytest.raises(HarnessError, match="size"):
        synthesize(tmp_path / "e", size=8)
