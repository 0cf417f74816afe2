"""The embedded Animal-MNIST: contents, split, loadability with timm, reproducible build."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data import create_dataset

from an_search.train.data import EMBEDDED_ROOT, resolve_data

CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
BUILD_SCRIPT = EMBEDDED_ROOT.parent / "build_animal_mnist.py"


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


@pytest.fixture(scope="module")
def source_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The source arrays, rebuilt from the committed tars (file name = source index)."""
    images = np.zeros((10000, 28, 28), np.uint8)
    labels = np.full(10000, -1, np.int64)
    for split in ("train", "validation"):
        with tarfile.open(EMBEDDED_ROOT / f"{split}.tar") as tf:
            for m in tf.getmembers():
                cls, index = re.fullmatch(r"(\w+)/(\d{5})\.png", m.name).groups()
                img = Image.open(io.BytesIO(tf.extractfile(m).read()))
                assert img.mode == "L" and img.size == (28, 28)
                images[int(index)] = np.asarray(img)
                labels[int(index)] = CLASSES.index(cls)
    assert (labels >= 0).all(), "some source index appears in neither split"
    return images, labels


@pytest.fixture(scope="module")
def build_module():
    spec = importlib.util.spec_from_file_location("build_animal_mnist", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_files_and_licence_present() -> None:
    for name in ("train.tar", "validation.tar", "LICENSE", "README.md"):
        assert (EMBEDDED_ROOT / name).is_file(), name
    licence = (EMBEDDED_ROOT / "LICENSE").read_text()
    assert "MIT License" in licence and "Copyright (c) 2025 SinaSR-6" in licence
    assert "Sina Mohammadi" in (EMBEDDED_ROOT / "README.md").read_text()


def test_split_sizes_and_stratification() -> None:
    train = Counter(m.name.split("/")[0] for m in _members(EMBEDDED_ROOT / "train.tar"))
    val = Counter(m.name.split("/")[0] for m in _members(EMBEDDED_ROOT / "validation.tar"))
    assert sorted(train) == CLASSES and sorted(val) == CLASSES
    assert set(train.values()) == {800} and set(val.values()) == {200}


def test_timm_reads_tars_with_ten_classes() -> None:
    spec = resolve_data(None)
    assert spec.num_classes == 10 and list(spec.class_names) == CLASSES
    ds = create_dataset("", root=spec.train_root)
    assert len(ds) == 8000
    assert ds.reader.class_name_to_idx == {c: i for i, c in enumerate(CLASSES)}
    img, target = ds[0]
    assert img.size == (28, 28) and img.mode == "RGB" and target == 0  # first member is a bear
    assert len(create_dataset("", root=spec.val_root)) == 2000


def test_tar_metadata_is_fixed_and_sorted() -> None:
    members = _members(EMBEDDED_ROOT / "validation.tar")
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {
        (1738627200, 0, 0, 0o644, "")
    }


def test_readme_hashes_match_tars() -> None:
    readme = (EMBEDDED_ROOT / "README.md").read_text()
    for name in ("train.tar", "validation.tar"):
        digest = hashlib.sha256((EMBEDDED_ROOT / name).read_bytes()).hexdigest()
        assert f"{name} sha256: {digest}" in readme


def test_split_is_the_seeded_stratified_split(source_arrays, build_module) -> None:
    _, labels = source_arrays
    assert np.bincount(labels).tolist() == [1000] * 10  # the source is balanced
    val_names = {m.name for m in _members(EMBEDDED_ROOT / "validation.tar")}
    val_idx = sorted(int(n[-9:-4]) for n in val_names)
    # Independent re-derivation: per class in label order, permute with one default_rng(0).
    rng = np.random.default_rng(0)
    expected = sorted(
        int(i) for c in range(10) for i in rng.permutation(np.flatnonzero(labels == c))[:200]
    )
    assert val_idx == expected
    assert build_module.stratified_split(labels)[1].tolist() == expected


def _decoded(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {
            m.name: np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read()))).tobytes()
            for m in tf.getmembers()
        }


def test_rebuild_is_deterministic_and_matches(source_arrays, build_module, tmp_path: Path) -> None:
    """Two builds give identical bytes; their images and names equal the committed tars'.

    (Byte equality with the committed files would tie the test to one Pillow/zlib version.)
    """
    images, labels = source_arrays
    build_module.build(images, labels, tmp_path / "a")
    build_module.build(images, labels, tmp_path / "b")
    for name in ("train.tar", "validation.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert _decoded(tmp_path / "a" / name) == _decoded(EMBEDDED_ROOT / name)
