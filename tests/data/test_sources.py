"""`check_datasets`: every COCO dataset the runs read is opened and checked once, before anything is logged.

Each failure is one `HarnessError` line, asserted exactly; file names that lead outside the image folder are
refused by the check and by `load_split` (the path every image read goes through).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import harness.data.coco as coco_module
from harness.config import DataConfig
from harness.data import SkippedImagesWarning, check_datasets, load_split, nested_subset, prepare_data
from harness.errors import HarnessError

IMAGES = [{"id": i, "width": 4, "height": 4} for i in (1, 2, 3)]
ANNOTATIONS = [{"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 3, "iscrowd": 1}]


def two_splits(root: Path, make_coco, *, train: list[dict] | None = None, val: list[dict] | None = None,
               train_anns: list[dict] | None = None, val_anns: list[dict] | None = None,
               val_categories: list[dict] | None = None) -> Path:
    """A root with train2017 (3 images) and val2017 (3 images) over the categories 1 'a', 3 'b', 7 'c'."""
    make_coco(root, IMAGES if train is None else train, ANNOTATIONS if train_anns is None else train_anns,
              split="train2017")
    make_coco(root, IMAGES if val is None else val, ANNOTATIONS if val_anns is None else val_anns,
              categories=val_categories, split="val2017")
    return root


def config(root: Path | str | None, **kw: object) -> DataConfig:
    return DataConfig(root=None if root is None else str(root), **kw)


def failure(*configs: DataConfig) -> str:
    """The one line `check_datasets` raises for runs r0, r1, ... reading `configs`."""
    with pytest.raises(HarnessError) as info:
        check_datasets((f"r{i}", c) for i, c in enumerate(configs))
    text = str(info.value)
    assert "\n" not in text
    return text


def ann_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def test_good_dataset_passes(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco)
    check_datasets([("a", config(root)), ("b", config(root, train_size=2, val_size=0.5, drop_empty=True))])


def test_synthetic_data_is_not_checked(tmp_path: Path) -> None:
    check_datasets([("synth", DataConfig(source="synthetic", root=str(tmp_path / "nowhere")))])


# --- roots and annotation files ----------------------------------------------------------------------------


def test_no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARNESS_COCO_ROOT", raising=False)
    assert failure(config(None)).startswith("run r0: no COCO root: pass --data-root DIR")


def test_missing_root_and_annotation_file(tmp_path: Path) -> None:
    assert failure(config(tmp_path / "nope")) == f"data root not found: {tmp_path / 'nope'}"
    (tmp_path / "train2017").mkdir()
    assert failure(config(tmp_path)) == f"annotation file not found: {ann_file(tmp_path, 'train2017')}"


def test_bad_json_names_file_line_and_column(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco)
    ann_file(root, "val2017").write_text('{\n  "images": [],\n  "annotations": [1,,2],\n  "categories": []\n}')
    assert failure(config(root)) == (
        f"{ann_file(root, 'val2017')}: not valid JSON: Expecting value at line 3, column 21"
    )


def test_not_utf8(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco)
    ann_file(root, "train2017").write_bytes(b'{"images": "\xff"}')
    assert failure(config(root)) == (
        f"{ann_file(root, 'train2017')}: not valid JSON: not UTF-8 text (invalid start byte at byte 12)"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"images": [], "categories": [{"id": 1, "name": "a"}]}', "missing key(s) 'annotations'"),
        ('{"images": [], "annotations": {}, "categories": [{"id": 1, "name": "a"}]}', "'annotations' is not a list"),
        ("[]", "the top level is not an object"),
    ],
)
def test_not_instances_json(tmp_path: Path, make_coco, content: str, problem: str) -> None:
    root = two_splits(tmp_path, make_coco)
    ann_file(root, "train2017").write_text(content)
    assert failure(config(root)) == f"{ann_file(root, 'train2017')}: not a COCO instances file ({problem})"


def test_unknown_category_and_image_id(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path / "cat", make_coco, val_anns=[{"image_id": 1, "category_id": 42}])
    assert failure(config(root)) == (
        f"{ann_file(root, 'val2017')}: annotations[0] (id 1, image 1) has category_id 42, which is not in "
        "'categories'"
    )
    root = two_splits(tmp_path / "img", make_coco, train_anns=[{"image_id": 1, "category_id": 1},
                                                               {"image_id": 9, "category_id": 1}])
    assert failure(config(root)) == f"{ann_file(root, 'train2017')}: annotations[1] (id 2) has unknown image_id 9"


def test_annotation_without_id_or_with_a_bad_bbox(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco)
    data = json.loads(ann_file(root, "val2017").read_text())
    data["annotations"][1]["bbox"] = [0, "x", 1, 1]
    ann_file(root, "val2017").write_text(json.dumps(data))
    assert failure(config(root)) == (
        f"{ann_file(root, 'val2017')}: annotation id 2 has bbox [0, 'x', 1, 1]: not 4 numbers"
    )
    del data["annotations"][0]["id"]
    ann_file(root, "val2017").write_text(json.dumps(data))
    assert failure(config(root)) == f"{ann_file(root, 'val2017')}: annotations[0] has no 'id'"


# --- train against val -------------------------------------------------------------------------------------


def test_category_mismatch_says_which_differ(tmp_path: Path, make_coco) -> None:
    cats = [{"id": 1, "name": "a"}, {"id": 3, "name": "bee"}, {"id": 8, "name": "d"}, {"id": 9, "name": "e"}]
    root = two_splits(tmp_path, make_coco, val_categories=cats)
    line = (
        f"{ann_file(root, 'train2017')} and {ann_file(root, 'val2017')} have different categories "
        "(ids only in train2017: 7 'c'; ids only in val2017: 8 'd', 9 'e'; names differ: 3 'b' vs 'bee'); "
        "train and val must share one class list"
    )
    assert failure(config(root)) == line
    with pytest.raises(HarnessError) as info:  # prepare_data says the same when the check is skipped
        prepare_data(root, cache_dir=None)
    assert str(info.value) == line


# --- image folders, empty splits, subset sizes -------------------------------------------------------------


def test_missing_image_folder(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco)
    for p in (root / "val2017").iterdir():
        p.unlink()
    (root / "val2017").rmdir()
    assert failure(config(root)) == f"image directory {root / 'val2017'} not found (split 'val2017')"


def test_empty_split(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco, val=[], val_anns=[])
    assert failure(config(root)) == f"{ann_file(root, 'val2017')}: split 'val2017' has no images"


def test_every_image_file_missing(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco, train=[{**i, "write": False} for i in IMAGES])
    assert failure(config(root)) == (
        f"{root / 'train2017'}: none of the 3 images listed in {ann_file(root, 'train2017')} is there "
        "(first: image id 1, file_name '000000000001.png')"
    )


def test_sizes_follow_prepare_data(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco)
    check_datasets([("fraction", config(root, train_size=1.0, val_size=0.01)), ("exact", config(root, val_size=3))])
    assert failure(config(root, train_size=4)) == (
        "run r0: train_size = 4: larger than the 3 images of split 'train2017'"
    )
    # drop_empty: image 3 has no annotations; without crowd boxes image 2 has none either
    assert failure(config(root, val_size=3, drop_empty=True)) == (
        "run r0: val_size = 3: larger than the 2 images of split 'val2017'"
    )
    assert failure(config(root, val_size=2, drop_empty=True, include_crowd=False)) == (
        "run r0: val_size = 2: larger than the 1 images of split 'val2017'"
    )
    # the runs are checked in order; the first failing one is named
    assert failure(config(root), config(root, val_size=5)).startswith("run r1: val_size = 5: larger than")


def test_drop_empty_leaves_nothing(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco, val_anns=[{"image_id": 1, "category_id": 1, "iscrowd": 1}])
    check_datasets([("r", config(root, drop_empty=True))])
    assert failure(config(root, drop_empty=True, include_crowd=False)) == (
        "run r0: no image of split 'val2017' has non-crowd annotations, and drop_empty is on"
    )


def test_one_split_for_train_and_val(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path, make_coco)
    check_datasets([("r", config(root, train_split="val2017", val_size=1, train_size=2))])
    assert failure(config(root, train_split="val2017")) == (
        "run r0: train_split and val_split are both 'val2017': give val_size so that disjoint train and val "
        "subsets can be drawn from it"
    )
    assert failure(config(root, train_split="val2017", val_size=1, train_size=3)) == (
        "run r0: train_size = 3: larger than the 2 images of split 'val2017'"
    )
    assert failure(config(root, train_split="val2017", val_size=3)) == (
        "run r0: val_size = 3 takes all 3 images of split 'val2017', which leaves none for train"
    )


def test_missing_files_of_the_drawn_subset(tmp_path: Path, make_coco) -> None:
    images = [{"id": i, "width": 4, "height": 4, "write": i != 2} for i in (1, 2, 3)]
    root = two_splits(tmp_path, make_coco, val=images)
    check_datasets([("lenient", config(root))])  # an unreadable image is skipped and counted, as before
    assert failure(config(root, strict_images=True)) == (
        f"run r0: 1 of the 3 val images it draws from split 'val2017' are not in {root / 'val2017'}, and "
        "strict_images is on (first: image id 2, file_name '000000000002.png')"
    )
    # a subset without the missing file is fine even under strict_images; one made only of it is not
    seed_of = {int(nested_subset(3, 1, seed, "val2017")[0]) + 1: seed for seed in range(30)}
    check_datasets([("strict", config(root, val_size=1, subset_seed=seed_of[1], strict_images=True))])
    assert failure(config(root, val_size=1, subset_seed=seed_of[2])) == (
        f"run r0: none of the 1 val images it draws from split 'val2017' is in {root / 'val2017'} "
        "(first: image id 2, file_name '000000000002.png')"
    )
    with pytest.raises(HarnessError, match="no readable images"), pytest.warns(SkippedImagesWarning):
        prepare_data(root, val_size=1, subset_seed=seed_of[2], cache_dir=None)


# --- file names outside the image folder ------------------------------------------------------------------


def _with_file_name(root: Path, split: str, image_id: int, name: str) -> None:
    data = json.loads(ann_file(root, split).read_text())
    next(i for i in data["images"] if i["id"] == image_id)["file_name"] = name
    ann_file(root, split).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name",
    ["../secret.png", "sub/../../secret.png", "/etc/passwd", "", ".", "..", "sub/..", "a\x00b.png"],
    ids=["dotdot", "nested-dotdot", "absolute", "empty", "dot", "parent", "subdir-parent", "nul"],
)
def test_file_name_outside_the_folder_is_refused_by_check_and_loader(tmp_path: Path, make_coco, name: str) -> None:
    root = two_splits(tmp_path / "data", make_coco)
    (tmp_path / "data" / "secret.png").write_bytes((root / "val2017" / "000000000001.png").read_bytes())
    _with_file_name(root, "val2017", 2, name)
    line = (f"{ann_file(root, 'val2017')}: image id 2 has file_name {name!r}, which is not inside the image "
            f"folder {root / 'val2017'}")
    assert failure(config(root)) == line
    for check_image_dir in (True, False):
        with pytest.raises(HarnessError) as info:
            load_split(root, "val2017", check_image_dir=check_image_dir)
        assert str(info.value) == line
    with pytest.raises(HarnessError) as info:
        prepare_data(root, cache_dir=None)
    assert str(info.value) == line


def test_symlink_leading_out_is_refused(tmp_path: Path, make_coco) -> None:
    root = two_splits(tmp_path / "data", make_coco)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes((root / "val2017" / "000000000001.png").read_bytes())
    os.symlink(outside / "x.png", root / "val2017" / "link.png")
    os.symlink(outside, root / "val2017" / "linkdir")
    for name in ("link.png", "linkdir/x.png"):
        _with_file_name(root, "val2017", 3, name)
        line = (f"{ann_file(root, 'val2017')}: image id 3 has file_name {name!r}, which is not inside the image "
                f"folder {root / 'val2017'}")
        assert failure(config(root)) == line
        with pytest.raises(HarnessError) as info:
            load_split(root, "val2017")
        assert str(info.value) == line


def test_links_that_stay_inside_and_a_linked_folder_are_fine(tmp_path: Path, make_coco) -> None:
    store = two_splits(tmp_path / "store", make_coco)
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        os.symlink(ann_file(store, split), ann_file(root, split))
        os.symlink(store / split, root / split)  # the image folder itself may live elsewhere
    (store / "val2017" / "sub").mkdir()
    os.rename(store / "val2017" / "000000000003.png", store / "val2017" / "sub" / "three.png")
    os.symlink("000000000001.png", store / "val2017" / "alias.png")
    _with_file_name(store, "val2017", 3, "sub/three.png")
    _with_file_name(store, "val2017", 2, "./alias.png")
    check_datasets([("r", config(root, strict_images=True))])
    data = prepare_data(root, cache_dir=None, strict_images=True)
    assert data.skipped == 0 and data.val_ids == [1, 2, 3]
    assert data.val_split.paths[1] == root / "val2017" / "./alias.png"


# --- each annotation file is read once ---------------------------------------------------------------------


def test_each_annotation_file_is_read_once(tmp_path: Path, make_coco, monkeypatch: pytest.MonkeyPatch) -> None:
    root = two_splits(tmp_path, make_coco)
    reads: list[str] = []
    real = coco_module._read_instances

    def counting(path: Path):
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(coco_module, "_read_instances", counting)
    runs = [
        ("a", config(root)), ("b", config(root, train_size=2)), ("c", config(str(root) + "/", val_size=0.5)),
        ("d", config(root, train_split="val2017", val_size=1)), ("e", config(root, drop_empty=True)),
        ("synth", DataConfig(source="synthetic")),
    ]
    check_datasets(runs)
    assert sorted(reads) == ["instances_train2017.json", "instances_val2017.json"]
    reads.clear()
    check_datasets(iter(runs))  # a generator, as the runner passes, works the same
    assert len(reads) == 2


def test_coco_mini_passes(coco_mini_root: Path) -> None:
    runs = [("all", config(coco_mini_root)), ("sizes", config(coco_mini_root, train_size=200, val_size=0.5)),
            ("one-split", config(coco_mini_root, train_split="val2017", val_size=100, drop_empty=True)),
            ("strict", config(coco_mini_root, strict_images=True))]
    t0 = time.perf_counter()
    check_datasets(runs)
    assert time.perf_counter() - t0 < 10  # about 0.05 s on 2 cores; generous for a shared machine
    assert failure(config(coco_mini_root, train_size=296)) == (
        "run r0: train_size = 296: larger than the 295 images of split 'train2017'"
    )
