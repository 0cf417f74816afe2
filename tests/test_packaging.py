"""What a non-editable install (``pip install .``, a wheel) ships: every file the code reads."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

import an_search
from an_search.layers import _native

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _shipped(path: Path) -> bool:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["an_search"]
    rel = path.relative_to(Path(an_search.__file__).parent).as_posix()
    return any(fnmatch.fnmatch(rel, pattern) for pattern in patterns)


def test_the_c_kernels_sources_and_headers_are_package_data() -> None:
    # Without them an installed package cannot build its kernels and silently runs ATen ops.
    files = [*_native._SOURCES, *_native._HEADERS]
    assert len(files) == 5 and all(path.is_file() for path in files)
    missing = [path.name for path in files if not _shipped(path)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_the_embedded_data_is_package_data() -> None:
    data = sorted((Path(an_search.__file__).parent / "data" / "animal_mnist").iterdir())
    assert {path.name for path in data} >= {"train.tar", "validation.tar"}
    assert all(_shipped(path) for path in data)
