"""Subset sizes (count / fraction / all), nesting across sizes and a val subset fixed across runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.data import nested_subset, prepare_data, resolve_size
from harness.errors import HarnessError


def test_resolve_size_counts_and_fractions() -> None:
    assert resolve_size(None, 639) == 639
    assert resolve_size(250, 639) == 250
    assert resolve_size(np.int64(7), 10) == 7
    assert resolve_size(0.5, 295) == 148  # round(147.5) to even
    assert resolve_size(1.0, 295) == 295
    assert resolve_size(1e-6, 295) == 1  # at least one image
    assert resolve_size(0.25, 64) == 16


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, -0.2, True, "10", [3]])
def test_resolve_size_rejects_bad_values(bad: object) -> None:
    with pytest.raises(HarnessError, match="train_size"):
        resolve_size(bad, 100, "train_size")  # type: ignore[arg-type]


def test_subset_larger_than_split_names_key_and_split() -> None:
    with pytest.raises(HarnessError, match=r"train_size = 500.*295 images of split 'train2017'"):
        resolve_size(500, 295, "train_size", "train2017")


def test_nested_and_seeded() -> None:
    small = nested_subset(639, 250, seed=3, split="train2017")
    large = nested_subset(639, 500, seed=3, split="train2017")
    assert len(small) == 250 and len(large) == 500
    assert set(small) <= set(large)
    assert np.array_equal(small, np.sort(small))
    assert np.array_equal(small, nested_subset(639, 250, seed=3, split="train2017"))
    assert not np.array_equal(small, nested_subset(639, 250, seed=4, split="train2017"))
    # a different split name gives a different draw with the same seed
    assert not np.array_equal(small, nested_subset(639, 250, seed=3, split="val2017"))


def test_prepare_nested_train_fixed_val(synth_root: Path, tmp_path: Path) -> None:
    kw = dict(image_size=16, cache_dir=tmp_path / "cache", workers=2, subset_seed=1)
    a = prepare_data(synth_root, train_size=16, val_size=8, **kw)
    b = prepare_data(synth_root, train_size=32, val_size=8, **kw)
    c = prepare_data(synth_root, train_size=0.75, val_size=8, **kw)
    assert set(a.train_ids) < set(b.train_ids) < set(c.train_ids)
    assert len(c.train_ids) == 48
    assert a.val_ids == b.val_ids == c.val_ids and len(a.val_ids) == 8
    assert np.array_equal(a.val_images.numpy(), c.val_images.numpy())
    # rows of the smaller subset equal the matching rows of the larger one
    pos = [b.train_ids.index(i) for i in a.train_ids]
    assert np.array_equal(a.train_images.numpy(), b.train_images.numpy()[pos])
    assert np.array_equal(a.train_targets.numpy(), b.train_targets.numpy()[pos])
    other = prepare_data(synth_root, train_size=16, val_size=8, **{**kw, "subset_seed": 2})
    assert other.val_ids != a.val_ids


def test_prepare_fraction_and_all(synth_root: Path, tmp_path: Path) -> None:
    data = prepare_data(synth_root, train_size=0.5, val_size=None, image_size=16, cache_dir=tmp_path)
    assert len(data.train_ids) == 32 and len(data.val_ids) == 32
    assert data.train_images.shape == (32, 3, 16, 16)


def test_prepare_subset_too_large(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"train_size = 65.*64 images of split 'train2017'"):
        prepare_data(synth_root, train_size=65, image_size=16, cache_dir=tmp_path)
    with pytest.raises(HarnessError, match="val_size"):
        prepare_data(synth_root, val_size=33, image_size=16, cache_dir=tmp_path)


def test_one_split_for_train_and_val_is_disjoint(synth_root: Path, tmp_path: Path) -> None:
    kw = dict(train_split="val2017", val_split="val2017", image_size=16, cache_dir=tmp_path)
    a = prepare_data(synth_root, train_size=8, val_size=10, **kw)
    b = prepare_data(synth_root, train_size=16, val_size=10, **kw)
    assert not set(a.train_ids) & set(a.val_ids)
    assert set(a.train_ids) < set(b.train_ids) and a.val_ids == b.val_ids
    with pytest.raises(HarnessError, match="val_size"):
        prepare_data(synth_root, train_size=8, **kw)
    with pytest.raises(HarnessError, match="train_size"):
        prepare_data(synth_root, train_size=23, val_size=10, **kw)  # only 22 left after val
