"""resolve_data layouts and errors; create_loaders splits, subsets and batches."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from an_search.errors import DataError
from an_search.train import create_loaders, resolve_data
from an_search.train.loaders import stratified_indices


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), color=128).save(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        resolve_data(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_one_class_folder(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / "cats" / f"{i}.png")
    with pytest.raises(DataError, match=r"only one class \('cats'\)"):
        resolve_data(tmp_path)


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        resolve_data(tmp_path)


def test_images_outside_class_folders(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="not in class folders"):
        resolve_data(tmp_path)


def test_val_class_unknown_to_train(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    _image(root / "val" / "unicorn" / "0.png")
    with pytest.raises(DataError, match="unicorn"):
        resolve_data(root)


def test_imagenet_layout(tiny_root: Path) -> None:
    spec = resolve_data(tiny_root)
    assert spec.num_classes == 10 and spec.holdout == 0
    assert spec.train_root.endswith("train") and spec.val_root.endswith("val")
    loaders = create_loaders(spec, img_size=32, batch_size=16)
    assert (loaders.num_train, loaders.num_val) == (120, 60)
    x, y = next(iter(loaders.train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(loaders.train) == 120 // 16  # full batches only


def test_class_folders_split_stratified_and_seeded(tiny_root: Path) -> None:
    spec = resolve_data(tiny_root / "train", holdout=0.25, seed=3)
    assert spec.holdout == 0.25 and spec.train_root == spec.val_root
    a = create_loaders(spec, img_size=32, batch_size=8)
    b = create_loaders(spec, img_size=32, batch_size=8)
    assert (a.num_train, a.num_val) == (90, 30)
    val_targets = [t for _, t in a.val.dataset.dataset.reader.samples]
    val_idx = a.val.dataset.indices
    assert val_idx == b.val.dataset.indices
    assert set(Counter(val_targets[i] for i in val_idx).values()) == {3}  # 25% of 12 per class
    assert not set(val_idx) & set(a.train.dataset.indices)


def test_train_fraction_is_stratified(tiny_root: Path) -> None:
    spec = resolve_data(tiny_root)
    loaders = create_loaders(spec, img_size=32, batch_size=4, train_fraction=0.5, seed=1)
    subset = loaders.train.dataset
    targets = [subset.dataset.reader.samples[i][1] for i in subset.indices]
    assert Counter(targets) == {c: 6 for c in range(10)}


def test_stratified_indices_keep_every_class() -> None:
    targets = np.array([0] * 50 + [1] * 3)
    chosen, rest = stratified_indices(targets, len(targets), 0.1, seed=0)
    assert Counter(targets[chosen]) == {0: 5, 1: 1}
    assert sorted([*chosen, *rest]) == list(range(53))


def test_a_holdout_trains_on_every_class() -> None:
    """A one-image class stays in training (it went wholly to validation, never trained on);
    a two-image class gives one to each side."""
    targets = np.array([0] * 50 + [1] + [2] * 2)
    val, train = stratified_indices(targets, len(targets), 0.2, seed=0, keep_rest=True)
    assert Counter(targets[val]) == {0: 10, 2: 1}
    assert Counter(targets[train]) == {0: 40, 1: 1, 2: 1}
    assert sorted([*val, *train]) == list(range(53))


def test_tar_file_as_data(tiny_root: Path, tmp_path: Path) -> None:
    tar = shutil.make_archive(str(tmp_path / "pool"), "tar", tiny_root / "train")
    spec = resolve_data(tar)
    assert spec.num_classes == 10 and spec.holdout == 0.2
    assert create_loaders(spec, img_size=32, batch_size=8).num_val == 20  # round(12 * 0.2) x 10


def test_batch_larger_than_data(tiny_root: Path) -> None:
    with pytest.raises(DataError, match="less than one batch"):
        create_loaders(resolve_data(tiny_root), img_size=32, batch_size=512)


def test_val_fraction_is_stratified() -> None:
    loaders = create_loaders(resolve_data(None), img_size=32, batch_size=8, val_fraction=0.05)
    subset = loaders.val.dataset
    targets = subset.dataset.reader.targets[subset.indices]
    assert np.bincount(targets).tolist() == [10] * 10


def test_named_dataset_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot open train data"):
        resolve_data(tmp_path, name="torch/mnist")
