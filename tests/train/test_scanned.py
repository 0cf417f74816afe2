"""A tar dataset is scanned once per process: later opens are copies of the kept index, each
with its own transform and open files; a rewritten tar is scanned again."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data.readers import reader_image_in_tar

from an_search.train import create_loaders, resolve_data
from an_search.train.data import open_dataset


def _tar(path: Path, per_class: dict[str, int]) -> Path:
    """A tar of <class>/<i>.png members, each image's value its index within the class."""
    src = path.parent / f"{path.stem}-src"
    with tarfile.open(path, "w") as tf:
        for name, n in per_class.items():
            for i in range(n):
                img = src / name / f"{i}.png"
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (8, 8), color=10 * i).save(img)
                tf.add(img, arcname=f"{name}/{i}.png")
    return path


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tar files timm indexed since the fixture started."""
    seen: list[str] = []
    real = reader_image_in_tar.extract_tarinfos

    def counting(root: str, *args: object, **kwargs: object) -> object:
        seen.append(root)
        return real(root, *args, **kwargs)

    monkeypatch.setattr(reader_image_in_tar, "extract_tarinfos", counting)
    return seen


def test_a_tar_is_scanned_once_and_each_open_is_its_own(tmp_path: Path, scans: list[str]) -> None:
    spec = resolve_data(_tar(tmp_path / "pool.tar", {"a": 6, "b": 4}))
    first, second = open_dataset(spec, "train"), open_dataset(spec, "train")
    assert len(scans) == 1  # (resolve_data opened it too: the first open of all)
    assert first is not second and first.reader is not second.reader
    assert len(first) == len(second) == 10
    assert np.array_equal(first.reader.targets, second.reader.targets)
    first.transform = lambda img: f"first's {np.asarray(img).mean():.0f}"
    assert second.transform is None and first[3][0] == "first's 30"  # a: 0, 10, 20, 30 ...
    assert np.asarray(second[3][0]).mean() == 30  # read through its own open tar file
    assert first.reader.tar_state.tf is not second.reader.tar_state.tf
    assert None not in (first.reader.tar_state.tf, second.reader.tar_state.tf)
    third = open_dataset(spec, "train")
    assert third.reader.tar_state.tf is None and np.asarray(third[9][0]).mean() == 30  # b/3
    assert len(scans) == 1


def test_a_rewritten_tar_is_scanned_again(tmp_path: Path, scans: list[str]) -> None:
    path = _tar(tmp_path / "pool.tar", {"a": 3, "b": 3})
    spec = resolve_data(path)
    assert len(open_dataset(spec, "train")) == 6
    _tar(path, {"a": 5, "b": 3})  # same path, new content
    os.utime(path, ns=(1, 1))  # (and another mtime however coarse the clock)
    assert len(open_dataset(resolve_data(path), "train")) == 8
    assert len(scans) == 2


def test_loaders_of_the_same_tar_train_alike(tmp_path: Path, scans: list[str]) -> None:
    """Two loaders from one kept index: the same batches, each through its own transform."""
    spec = resolve_data(_tar(tmp_path / "pool.tar", {"a": 8, "b": 8}))
    batches = []
    for size in (8, 12):
        loaders = create_loaders(spec, img_size=size, batch_size=4, hflip=0.0, scale=(1, 1))
        x, y = next(iter(loaders.train))
        batches.append((x.shape[-1], y.tolist()))
    assert batches[0][0] == 8 and batches[1][0] == 12  # each its own transform
    assert batches[0][1] == batches[1][1]
    assert len(scans) == 1


def test_a_tar_rewritten_in_place_at_its_size_and_mtime_is_scanned_again(
    tmp_path: Path, scans: list[str]
) -> None:
    """``cp --preserve=timestamps`` or ``rsync -t --inplace``: same inode, size and mtime, new
    members (class a renamed c, names of one length: the same tar size). Its ctime changed."""
    path = _tar(tmp_path / "pool.tar", {"a": 3, "b": 3})
    st = os.stat(path)
    assert resolve_data(path).class_names == ("a", "b")
    with open(_tar(tmp_path / "new.tar", {"c": 3, "b": 3}), "rb") as src, open(path, "r+b") as dst:
        dst.write(src.read())  # (in place: the same inode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = os.stat(path)
    assert (again.st_ino, again.st_size, again.st_mtime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )
    assert resolve_data(path).class_names == ("b", "c")
    assert len(scans) == 2
