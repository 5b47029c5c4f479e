"""Held-out data: the test subset (tail of the val split's permutation, disjoint from train and val), object
areas for COCO's size buckets, and the synthetic task's geometry ranges and out-of-distribution split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from harness.config import DataConfig, SyntheticConfig, SyntheticGeometry
from harness.data import DataCache, check_datasets, nested_subset, prepare_data, synthesize
from harness.data.subsets import tail_subset
from harness.data.synth import OOD_SPLIT, Geometry, render_chunk
from harness.errors import HarnessError


def test_tail_subset_is_disjoint_from_every_val_prefix() -> None:
    test = tail_subset(100, 20, seed=1, split="val2017")
    val = nested_subset(100, None, seed=1, split="val2017", tail=len(test))
    assert len(test) == 20 and len(val) == 80 and not set(test) & set(val)
    assert np.array_equal(nested_subset(100, 30, 1, "val2017", tail=20), nested_subset(100, 30, 1, "val2017"))
    assert len(tail_subset(100, None, 1, "val2017")) == 0
    assert len(tail_subset(100, 0.25, 1, "val2017")) == 25


def test_coco_mini_test_subset_is_disjoint_from_train_and_val(coco_mini_root: Path) -> None:
    data = prepare_data(coco_mini_root, val_size=100, test_size=100, image_size=32, cache_dir=None, workers=2)
    train, val, test = set(data.train_ids), set(data.val_ids), set(data.test_ids)
    assert (len(train), len(val), len(test)) == (295, 100, 100)
    assert not train & val and not train & test and not val & test
    assert data.test_images is not None and data.test_images.shape[0] == 100
    assert data.test_targets is not None and data.test_targets.shape == (100, 80)
    assert data.summary()["test_images"] == 100
    # adding a test set leaves a val subset of the same size unchanged
    plain = prepare_data(coco_mini_root, val_size=100, image_size=32, cache_dir=None, workers=2)
    assert plain.val_ids == data.val_ids and plain.test_images is None


def test_coco_mini_one_split_for_train_val_and_test(coco_mini_root: Path) -> None:
    data = prepare_data(coco_mini_root, train_split="val2017", val_split="val2017", val_size=50, test_size=0.25,
                        image_size=32, cache_dir=None, workers=2)
    train, val, test = set(data.train_ids), set(data.val_ids), set(data.test_ids)
    assert (len(val), len(test), len(train)) == (50, 86, 344 - 50 - 86)
    assert not train & val and not train & test and not val & test


def test_largest_area_is_in_original_pixels(coco_mini_root: Path) -> None:
    data = prepare_data(coco_mini_root, val_size=20, test_size=20, image_size=32, cache_dir=None, workers=2)
    doc = json.loads((coco_mini_root / "annotations" / "instances_val2017.json").read_text())
    info = {im["id"]: im for im in doc["images"]}
    areas: dict[int, list[float]] = {}
    for ann in doc["annotations"]:
        areas.setdefault(ann["image_id"], []).append(ann["area"])
    for image_id, got in zip(data.test_ids, data.largest_areas("test"), strict=True):
        im = info[image_id]
        if image_id not in areas:
            assert np.isnan(got)
            continue
        scale = im.get("orig_width", im["width"]) * im.get("orig_height", im["height"]) / (im["width"] * im["height"])
        assert got == pytest.approx(max(areas[image_id]) * scale)


def test_test_size_that_leaves_no_val_is_refused(tmp_path: Path, make_coco) -> None:
    images = [{"id": i, "width": 8, "height": 8} for i in range(1, 5)]
    anns = [{"image_id": i, "category_id": 1} for i in range(1, 5)]
    for split in ("train2017", "val2017"):
        make_coco(tmp_path, images, anns, split=split)
    with pytest.raises(HarnessError, match="test_size = 4 takes all 4 images.*none for val"):
        prepare_data(tmp_path, test_size=4, image_size=8, cache_dir=None)
    with pytest.raises(HarnessError, match="run r: test_size = 4 takes all 4 images"):
        check_datasets([("r", DataConfig(root=str(tmp_path), test_size=4))])
    with pytest.raises(HarnessError, match="run r: val_size = 2 and test_size = 2 take all 4"):
        check_datasets([("r", DataConfig(root=str(tmp_path), train_split="val2017", val_size=2, test_size=2))])
    check_datasets([("r", DataConfig(root=str(tmp_path), test_size=2))])


def test_default_geometry_matches_the_config_defaults() -> None:
    assert tuple(SyntheticGeometry().model_dump().values()) == tuple(vars(Geometry()).values())


def test_geometry_ranges_are_validated() -> None:
    with pytest.raises(ValidationError, match="rotation must be"):
        SyntheticGeometry(rotation=(20, -20))
    with pytest.raises(ValidationError, match="stretch must be.*low >= 1.0"):
        SyntheticGeometry(stretch=(0.5, 1.5))
    with pytest.raises(ValidationError, match="n_ood .* and ood_geometry go together"):
        SyntheticConfig(n_ood=10)
    with pytest.raises(ValidationError, match="go together"):
        SyntheticConfig(ood_geometry=SyntheticGeometry())
    with pytest.raises(HarnessError, match="geometry scale"):
        Geometry(scale=(0.5, 0.1)).check()


def _disk_box_ratios(geometry: Geometry) -> np.ndarray:
    """Long over short side of the box of each image's one disk (64 px, one object per image)."""
    _, anns = render_chunk(0, 0, 0, 32, 64, n_classes=1, max_objects=1, geometry=geometry)
    sides = np.array([a[0]["bbox"][2:] for a in anns if a])
    return sides.max(1) / sides.min(1)


def test_geometry_ranges_bound_the_draw() -> None:
    upright = {"rotation": (0.0, 0.0), "warp": (0.0, 0.0)}
    round_disks = _disk_box_ratios(Geometry(stretch=(1.0, 1.0), **upright))
    stretched = _disk_box_ratios(Geometry(stretch=(2.5, 2.5), **upright))
    assert np.all(round_disks < 1.15)
    assert np.all((stretched > 2.1) & (stretched < 2.9))  # axis-aligned: the box has the disk's aspect
    turned = _disk_box_ratios(Geometry(stretch=(2.5, 2.5), rotation=(45.0, 45.0), warp=(0.0, 0.0)))
    assert np.all(turned < 1.3)  # at 45° the stretched disk's box is square again


def test_synthesize_writes_an_ood_split(tmp_path: Path) -> None:
    ood = Geometry(rotation=(-180.0, 180.0), scale=(0.5, 0.7), stretch=(2.0, 2.5))
    result = synthesize(tmp_path / "s", n_train=8, n_val=8, size=32, geometry=Geometry(rotation=(-20.0, 20.0)),
                        n_ood=8, ood_geometry=ood)
    assert result.n_ood == 8
    doc = json.loads((tmp_path / "s" / "annotations" / f"instances_{OOD_SPLIT}.json").read_text())
    assert len(doc["images"]) == 8 and min(im["id"] for im in doc["images"]) > 2_000_000_000
    assert doc["info"]["generator"]["geometry"]["stretch"] == [2.0, 2.5]
    with pytest.raises(HarnessError, match="both or neither"):
        synthesize(tmp_path / "t", n_train=8, n_val=8, size=32, n_ood=8)


def test_data_cache_prepares_synthetic_test_and_ood_sets(tmp_path: Path) -> None:
    config = DataConfig.model_validate({
        "source": "synthetic", "image_size": 32, "test_size": 8,
        "synthetic": {"n_train": 16, "n_val": 24, "n_ood": 8, "train_geometry": {"rotation": [-20, 20]},
                      "ood_geometry": {"rotation": [-180, 180], "stretch": [1.5, 2.5]}},
    })
    data = DataCache(tmp_path).get(config, lambda *_: None)
    assert (len(data.train_ids), len(data.val_ids), len(data.test_ids), len(data.ood_ids)) == (16, 16, 8, 8)
    assert not set(data.val_ids) & set(data.test_ids)
    assert data.ood_images is not None and data.ood_images.shape == (8, 3, 32, 32)
    assert data.ood_split is not None and data.ood_split.split == OOD_SPLIT
    # another geometry is another generated task, in its own folder
    other = config.model_copy(update={"synthetic": config.synthetic.model_copy(update={"n_ood": 0,
                                                                                       "ood_geometry": None})})
    assert DataCache(tmp_path).get(other, lambda *_: None).ood_images is None
    assert len(list((tmp_path / "data").iterdir())) == 2
