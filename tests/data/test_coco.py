"""Reading COCO splits: classes, id ↔ index, targets, empty images, crowd boxes, bad input."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from harness.data import load_split, split_summary
from harness.errors import HarnessError

COCO_GAP_IDS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def test_coco_mini_has_80_classes_in_id_order(coco_mini_root: Path) -> None:
    split = load_split(coco_mini_root, "val2017")
    assert split.num_classes == 80
    ids = split.index_to_id
    assert ids == sorted(ids) and ids[0] == 1 and ids[-1] == 90
    assert sorted(set(range(1, 91)) - set(ids)) == COCO_GAP_IDS
    mapping = split.id_to_index
    assert mapping[1] == 0 and mapping[11] == 10 and mapping[13] == 11 and mapping[90] == 79
    assert split.class_names[0] == "person" and split.class_names[79] == "toothbrush"
    assert [c["index"] for c in split.categories] == list(range(80))
    assert split.targets.shape == (344, 80) and split.targets.dtype == np.float32
    assert split.image_ids == sorted(split.image_ids)


def test_coco_mini_targets_match_raw_json(coco_mini_root: Path) -> None:
    raw = json.loads((coco_mini_root / "annotations" / "instances_train2017.json").read_text())
    cats_of: dict[int, set[int]] = defaultdict(set)
    for a in raw["annotations"]:
        cats_of[a["image_id"]].add(a["category_id"])
    split = load_split(coco_mini_root, "train2017")
    id_of_index = [c["id"] for c in sorted(raw["categories"], key=lambda c: c["id"])]
    checked = 0
    for img in raw["images"][::37]:
        row = split.targets[split.image_ids.index(img["id"])]
        assert {id_of_index[i] for i in np.nonzero(row)[0]} == cats_of[img["id"]]
        checked += 1
    assert checked >= 8
    assert split.num_annotations == len(raw["annotations"])
    pos = split.image_ids.index(raw["images"][0]["id"])
    assert split.paths[pos] == coco_mini_root / "train2017" / raw["images"][0]["file_name"]
    assert (split.widths[pos], split.heights[pos]) == (raw["images"][0]["width"], raw["images"][0]["height"])


def test_empty_images_kept_by_default_and_dropped_on_request(coco_mini_root: Path) -> None:
    split = load_split(coco_mini_root, "val2017")
    empty = int((split.targets.sum(1) == 0).sum())
    assert empty == 2
    dropped = load_split(coco_mini_root, "val2017", drop_empty=True)
    assert len(dropped) == len(split) - 2
    assert (dropped.targets.sum(1) > 0).all()


def test_crowd_boxes_count_unless_excluded(coco_mini_root: Path) -> None:
    raw = json.loads((coco_mini_root / "annotations" / "instances_val2017.json").read_text())
    n_crowd = sum(a["iscrowd"] for a in raw["annotations"])
    assert n_crowd > 0
    with_crowd = load_split(coco_mini_root, "val2017")
    without = load_split(coco_mini_root, "val2017", include_crowd=False)
    assert with_crowd.num_annotations - without.num_annotations == n_crowd
    # coco-mini has no (image, category) pair present only through crowd boxes, so the targets agree
    assert np.array_equal(with_crowd.targets, without.targets)
    assert sum(int(c.sum()) for c in with_crowd.box_crowd) == n_crowd
    assert not any(c.any() for c in without.box_crowd)


def test_crowd_only_category_flips_to_negative(tmp_path: Path, make_coco) -> None:
    root = make_coco(tmp_path, [{"id": 1, "width": 4, "height": 4}],
                     [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 3, "iscrowd": 1}])
    assert load_split(root, "val2017").targets.tolist() == [[1, 1, 0]]
    assert load_split(root, "val2017", include_crowd=False).targets.tolist() == [[1, 0, 0]]


def test_boxes_kept_per_image(coco_mini_root: Path) -> None:
    split = load_split(coco_mini_root, "val2017")
    raw = json.loads((coco_mini_root / "annotations" / "instances_val2017.json").read_text())
    first = raw["annotations"][0]
    pos = split.image_ids.index(first["image_id"])
    boxes = [b.tolist() for b in split.boxes[pos]]
    assert any(np.allclose(b, first["bbox"], atol=1e-3) for b in boxes)
    assert len(split.box_labels[pos]) == sum(a["image_id"] == first["image_id"] for a in raw["annotations"])


def test_synthetic_split(synth_root: Path) -> None:
    split = load_split(synth_root, "train2017")
    assert len(split) == 64 and split.num_classes == 8
    assert split.class_names[0] == "disk"
    summary = split_summary(split)
    assert summary["images"] == 64 and summary["annotations"] == split.num_annotations
    assert sum(c["annotations"] for c in summary["categories"]) == split.num_annotations


def test_gapped_ids_and_subset(tmp_path: Path, make_coco) -> None:
    root = make_coco(tmp_path, [{"id": 5, "width": 8, "height": 6}, {"id": 2, "width": 4, "height": 4}],
                     [{"image_id": 5, "category_id": 7}, {"image_id": 5, "category_id": 1},
                      {"image_id": 2, "category_id": 3, "iscrowd": 1}])
    split = load_split(root, "val2017")
    assert split.image_ids == [2, 5]
    assert split.id_to_index == {1: 0, 3: 1, 7: 2}
    assert split.targets.tolist() == [[0, 1, 0], [1, 0, 1]]
    sub = split.subset([1])
    assert sub.image_ids == [5] and sub.targets.tolist() == [[1, 0, 1]] and sub.num_annotations == 2
    no_crowd = load_split(root, "val2017", include_crowd=False, drop_empty=True)
    assert no_crowd.image_ids == [5]


# --- bad input: one HarnessError naming the path or key -------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=str(tmp_path / "nope")):
        load_split(tmp_path / "nope", "val2017")


def test_missing_annotation_file(tmp_path: Path) -> None:
    (tmp_path / "val2017").mkdir()
    with pytest.raises(HarnessError, match=r"instances_val2017\.json"):
        load_split(tmp_path, "val2017")


def test_missing_image_dir(tmp_path: Path, make_coco) -> None:
    root = make_coco(tmp_path, [{"id": 1, "width": 4, "height": 4}], [])
    (root / "val2017" / "000000000001.png").unlink()
    (root / "val2017").rmdir()
    with pytest.raises(HarnessError, match=str(root / "val2017")):
        load_split(root, "val2017")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[1, 2]", "top level"),
        ('{"images": [], "annotations": []}', "'categories'"),
        ('{"images": {}, "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "'images'"),
        ("{not json", "not valid JSON"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "file_name"),
    ],
)
def test_not_coco_instances(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(content)
    with pytest.raises(HarnessError) as info:
        load_split(tmp_path, "val2017")
    assert str(path) in str(info.value) and needle in str(info.value)


def test_unknown_category_id(tmp_path: Path, make_coco) -> None:
    root = make_coco(tmp_path, [{"id": 1, "width": 4, "height": 4}], [{"image_id": 1, "category_id": 42}])
    with pytest.raises(HarnessError, match=r"category_id 42") as info:
        load_split(root, "val2017")
    assert "instances_val2017.json" in str(info.value)


def test_unknown_image_id(tmp_path: Path, make_coco) -> None:
    root = make_coco(tmp_path, [{"id": 1, "width": 4, "height": 4}], [{"image_id": 9, "category_id": 1}])
    with pytest.raises(HarnessError, match=r"image_id 9"):
        load_split(root, "val2017")
