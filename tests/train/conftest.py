"""Shared fixtures: a tiny ImageNet-layout dataset cut from the embedded Animal-MNIST."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest

from an_search.train.data import EMBEDDED_ROOT


def _extract(tar_path: Path, out: Path, per_class: int) -> None:
    taken: Counter[str] = Counter()
    with tarfile.open(tar_path) as tf:
        for member in tf.getmembers():
            cls = member.name.split("/")[0]
            if taken[cls] < per_class:
                taken[cls] += 1
                target = out / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tf.extractfile(member).read())


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train/<class>/*.png (12 per class) and root/val/<class>/*.png (6 per class)."""
    root = tmp_path_factory.mktemp("tiny")
    _extract(EMBEDDED_ROOT / "train.tar", root / "train", 12)
    _extract(EMBEDDED_ROOT / "validation.tar", root / "val", 6)
    return root
