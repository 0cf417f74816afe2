"""Build the embedded Animal-MNIST dataset (train.tar, validation.tar, README.md) from its source.

Animal-MNIST ("Animal-Shape", Sina Mohammadi, MIT licence, Copyright (c) 2025 SinaSR-6) is 10,000
real 28x28 grayscale animal silhouettes in 10 balanced classes, shipped in the `animal_mnist` wheel
(PyPI, version 0.4) as two gzip'd pickles of numpy arrays:
``animal_data_version_3.gz`` (10000, 28, 28) uint8 and ``animal_label_version_3.gz`` (10000,) int64.
We never depend on that package (its metadata pulls in tensorflow); this script converts the two
files once and the outputs are committed under ``an_search/data/animal_mnist/``.

Output: a stratified, seeded (seed 0) 80/20 split written as two uncompressed tars of PNGs in class
folders (``bear/00017.png``; the number is the image's index in the source arrays), which
``timm.data.create_dataset('', root='.../train.tar')`` reads with ``ReaderImageInTar``. The tars
are byte-for-byte reproducible: members sorted by name, fixed mtime/uid/gid/mode, ustar format,
PNGs written by Pillow with ``optimize=True`` (identical bytes need the same Pillow/zlib build).

Usage::

    python an_search/data/build_animal_mnist.py \\
        --images animal_mnist/data/Animal_MNIST/animal_data_version_3.gz \\
        --labels animal_mnist/data/Animal_MNIST/animal_label_version_3.gz \\
        --license animal_mnist-0.4.dist-info/licenses/LICENSE \\
        --out an_search/data/animal_mnist
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Label order as given in the package description (labels 0..9).
CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
VAL_FRACTION = 0.2
SEED = 0
_MTIME = 1738627200  # 2025-02-04, the date of the source files; any fixed value keeps bytes stable


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only what a plain numpy array pickle needs (no arbitrary code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an array pickle")
        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core
            for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return importlib.import_module(mod)._reconstruct
                except ImportError:
                    continue
        return getattr(np, name)


def load_source(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the two gzip'd array pickles; check shapes, dtypes and label range."""
    with gzip.open(images_gz, "rb") as f:
        images = np.asarray(_NumpyOnlyUnpickler(f).load(), dtype=np.uint8)
    with gzip.open(labels_gz, "rb") as f:
        labels = np.asarray(_NumpyOnlyUnpickler(f).load(), dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f"unexpected source shapes {images.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(f"labels outside 0..{len(CLASSES) - 1}")
    return images, labels


def stratified_split(
    labels: np.ndarray, val_fraction: float = VAL_FRACTION, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: a seeded permutation, the first round(n * val_fraction) to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(CLASSES)):  # fixed class order keeps the generator's draws reproducible
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_tar(path: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """Write ``<class>/<index:05d>.png`` members, sorted, with fixed metadata (atomic replace)."""
    members = sorted((f"{CLASSES[labels[i]]}/{i:05d}.png", int(i)) for i in indices)
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, i in members:
            data = _png_bytes(images[i])
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _readme(train: np.ndarray, val: np.ndarray, labels: np.ndarray, out: Path) -> str:
    per_class = " | ".join(
        f"{c} {int((labels[train] == k).sum())}/{int((labels[val] == k).sum())}"
        for k, c in enumerate(CLASSES)
    )
    return f"""# Animal-MNIST (embedded)

Animal-MNIST, also called Animal-Shape, by Sina Mohammadi: 10,000 real 28x28 grayscale animal
silhouettes in 10 balanced classes of 1,000, made to mimic the MNIST format.

- Source: the `animal_mnist` package, version 0.4, on PyPI (files
  `animal_mnist/data/Animal_MNIST/animal_data_version_3.gz` and `animal_label_version_3.gz`).
- Licence: MIT, Copyright (c) 2025 SinaSR-6; full text in `LICENSE` next to this file.
- Classes (label order from the package description, folder = class index by sorted name):
  {", ".join(f"{k} {c}" for k, c in enumerate(CLASSES))}.

## Files and split
`train.tar` ({len(train)} images) and `validation.tar` ({len(val)} images): uncompressed tars of
PNGs in class folders, `<class>/<index>.png`, where `<index>` is the image's position in the source
arrays. The split is stratified (per class 80/20, train/validation) and seeded (numpy
`default_rng(0)`). Per class, train/validation: {per_class}.

Rebuilt byte-for-byte by `an_search/data/build_animal_mnist.py` (same Pillow/zlib build).

- train.tar sha256: {_sha256(out / "train.tar")}
- validation.tar sha256: {_sha256(out / "validation.tar")}
"""


def build(
    images: np.ndarray, labels: np.ndarray, out: Path, *, license_file: Path | None = None
) -> None:
    """Write train.tar, validation.tar and README.md (and LICENSE when given) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    train, val = stratified_split(labels)
    write_tar(out / "train.tar", images, labels, train)
    write_tar(out / "validation.tar", images, labels, val)
    (out / "README.md").write_text(_readme(train, val, labels, out), encoding="utf-8")
    if license_file is not None:
        shutil.copyfile(license_file, out / "LICENSE")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="animal_data_version_3.gz")
    parser.add_argument("--labels", type=Path, required=True, help="animal_label_version_3.gz")
    parser.add_argument("--license", type=Path, default=None, help="the package's LICENSE file")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "animal_mnist")
    args = parser.parse_args(argv)
    images, labels = load_source(args.images, args.labels)
    build(images, labels, args.out, license_file=args.license)


if __name__ == "__main__":
    main()
