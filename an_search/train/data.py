"""Where the training images come from: `DataSpec` and `resolve_data`.

`resolve_data` turns what the user typed (nothing, a folder, a tar, or a timm dataset name plus a
root) into a `DataSpec`: the train and validation roots as `timm.data.create_dataset` takes them,
the number of classes and the normalisation. It checks the layout up front so a bad path fails
with a one-line `DataError` before any model is built. `loaders.create_loaders` makes the loaders.

Accepted layouts (images: .png .jpg .jpeg, as timm reads, and .webp .bmp .tif(f) .gif ...):

- None: the embedded Animal-MNIST (8000 train / 2000 validation, 10 classes).
- root/train/<class>/... with root/val/<class>/... (or validation/, or train.tar + val.tar):
  the ImageNet layout, both splits given.
- root/<class>/..., root/train/<class>/... alone, or a .tar of <class>/... members: one pool,
  split seeded and stratified (80/20 by default; a class keeps at least one training image).
- name="torch/cifar10" (any timm dataset name) with path as its root: timm's own splits.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset

from an_search.errors import DataError

from ._readers import clean_reader, more_image_extensions
from ._scanned import opened, tar_key

__all__ = ["EMBEDDED_ROOT", "DataSpec", "dataset_targets", "open_dataset", "resolve_data"]

EMBEDDED_ROOT = Path(__file__).resolve().parents[1] / "data" / "animal_mnist"
_ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep")
_ANIMAL_MEAN, _ANIMAL_STD = (0.273,) * 3, (0.406,) * 3  # measured on train.tar (grayscale as RGB)
_TRAIN_NAMES = ("train", "training")
_VAL_NAMES = ("val", "validation", "valid", "eval", "test")
_PACKED = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".rar")
_LAYOUT_HINT = "use root/<class>/<image> or root/train/<class>/... plus root/val/<class>/..."
#: timm's torchvision datasets (``timm.data.create_dataset``'s ``torch/`` names).
_TORCH_NAMES = (
    "cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "qmnist", "imagenet",
    "places365", "inaturalist", "inat", "image_folder", "folder",
)  # fmt: skip
_NAMED_HINT = (
    "put its files in the root as torchvision keeps them (e.g. ROOT/MNIST/raw/, "
    "ROOT/cifar-10-batches-py/); nothing is downloaded"
)


@dataclass(frozen=True)
class DataSpec:
    """A resolved dataset: what `create_dataset` needs for each split, plus its shape.

    Attributes:
        train_root: root passed to `timm.data.create_dataset` for the training split.
        val_root: root for the validation split (equal to `train_root` when `holdout` > 0).
        num_classes: classes found in the training split (the model's classifier width).
        name: timm dataset name, "" for folders and tars ("torch/cifar10", "hfds/...").
        class_names: class folder names in label order (empty when the dataset has none).
        in_chans: input channels after loading (images are converted to `img_mode`).
        img_mode: PIL mode every image is converted to ("RGB": grayscale is repeated).
        mean: per-channel normalisation mean, in [0, 1] units.
        std: per-channel normalisation std.
        holdout: fraction of `train_root` held out for validation (0 = separate val split).
        split_seed: seed of the holdout split.
        train_split: split name for timm datasets with their own splits.
        val_split: validation split name for those datasets.
        download: let timm download a torchvision dataset that is missing.
        description: one line for reports, e.g. "Animal-MNIST (embedded)".
        unseen_classes: training classes with no image in a separate validation split.
    """

    train_root: str
    val_root: str
    num_classes: int
    name: str = ""
    class_names: tuple[str, ...] = ()
    in_chans: int = 3
    img_mode: str = "RGB"
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    holdout: float = 0.0
    split_seed: int = 0
    train_split: str = "train"
    val_split: str = "validation"
    download: bool = False
    description: str = ""
    unseen_classes: tuple[str, ...] = ()

    def unseen_note(self) -> str | None:
        """A one-line note when the validation split lacks classes (None: it has them all)."""
        if not self.unseen_classes:
            return None
        n, shown = len(self.unseen_classes), ", ".join(self.unseen_classes[:3])
        more = ", ..." if n > 3 else ""
        return (
            f"note: the validation split has no images of {n} of the {self.num_classes} "
            f"classes ({shown}{more}): top-1 never tests them"
        )


def open_dataset(spec: DataSpec, split: str, *, class_map: dict | None = None) -> Any:
    """Open one split ("train" or "validation") with timm, no transform; DataError on failure."""
    is_train = split == "train"
    root = spec.train_root if is_train else spec.val_root
    fixed = None if class_map is None else tuple(sorted(class_map.items()))
    key = None if spec.name else tar_key(root, split, fixed, spec.img_mode)
    return opened(key, lambda: _open_dataset(spec, split, root, class_map))


def _open_dataset(spec: DataSpec, split: str, root: str, class_map: dict | None) -> Any:
    is_train = split == "train"
    try:
        # (timm's hfds/tfds readers print "Please install ..." to stdout when first imported
        # without their package: the ImportError below says it, and stdout is the caller's)
        with more_image_extensions(), contextlib.redirect_stdout(io.StringIO()):
            ds = create_dataset(
                spec.name,
                root=root,
                split=spec.train_split if is_train else spec.val_split,
                search_split=False,  # roots are already split-specific (or a holdout of one)
                class_map=class_map,
                download=spec.download,
                input_img_mode=spec.img_mode,
            )
    except ImportError as e:  # an optional package of timm's or torchvision's readers
        missing = getattr(e, "name", None) or str(e)
        raise DataError(
            f"reading {spec.name or 'this data'} needs the Python package {missing!r}, which is "
            f"not installed: pip install {missing.split('.')[0]}"
        ) from e
    except (AssertionError, OSError, RuntimeError, ValueError, KeyError, tarfile.TarError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, tarfile.TarError):
            detail = f"not a readable tar: {detail}"
        if "Found 0 images" in detail:  # timm's ReaderImageFolder on a folder without images
            raise DataError(f"no images found in {root} (.png, .jpg, ...); {_LAYOUT_HINT}") from e
        if spec.name:  # (torchvision's own advice, download=True, is not ours to give)
            detail = re.split(r" You can (?:use|set) download=True", detail)[0]
            raise DataError(
                f"cannot open {spec.name}'s {split} split in {root!r} ({detail}); {_NAMED_HINT}"
            ) from e
        raise DataError(f"cannot open {split} data at {root!r} ({detail}); {_LAYOUT_HINT}") from e
    clean_reader(ds, root, fixed_classes=class_map is not None)  # hidden files, nested folders
    return ds


def dataset_targets(ds: Any) -> np.ndarray | None:
    """Integer labels of every sample without decoding images, or None if the dataset hides them."""
    reader = getattr(ds, "reader", None)
    if hasattr(reader, "targets"):  # timm ReaderImageInTar
        return np.asarray(reader.targets, dtype=np.int64)
    if isinstance(getattr(reader, "samples", None), list):  # timm ReaderImageFolder
        return np.asarray([t for _, t in reader.samples], dtype=np.int64)
    if hasattr(ds, "targets"):  # torchvision datasets
        return np.asarray(ds.targets, dtype=np.int64)
    return None


def _class_map(ds: Any) -> dict[str, int]:
    reader = getattr(ds, "reader", None)
    for obj, attr in (
        (reader, "class_to_idx"),
        (reader, "class_name_to_idx"),
        (ds, "class_to_idx"),
    ):
        mapping = getattr(obj, attr, None)
        if isinstance(mapping, dict):
            return dict(mapping)
    targets = dataset_targets(ds)
    return {} if targets is None else {str(t): int(t) for t in np.unique(targets)}


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (root / name, root / f"{name}.tar"):
            if candidate.exists():
                return candidate
    return None


def _check_classes(spec: DataSpec, where: str) -> DataSpec:
    """Open the training split once to count classes and images; fill in num_classes."""
    ds = open_dataset(spec, "train")
    classes = _class_map(ds)
    if len(ds) == 0 or not classes:
        raise DataError(f"no images found in {where}; {_LAYOUT_HINT}")
    if "" in classes:
        raise DataError(f"images directly in {where}, not in class folders; {_LAYOUT_HINT}")
    if len(classes) < 2:
        only = next(iter(classes))
        raise DataError(f"only one class ({only!r}) in {where}; add a folder per class")
    names = tuple(sorted(classes, key=classes.__getitem__))
    if spec.val_root != spec.train_root or spec.name:
        val_classes = _class_map(open_dataset(spec, "validation"))
        unknown = sorted(set(val_classes) - set(classes))
        if not val_classes:
            raise DataError(f"no validation images in {spec.val_root}; {_LAYOUT_HINT}")
        if unknown and not spec.name:
            raise DataError(f"validation classes {unknown[:3]} not in training; rename or remove")
        unseen = () if spec.name else tuple(c for c in names if c not in val_classes)
        spec = DataSpec(**{**spec.__dict__, "unseen_classes": unseen})
    return DataSpec(**{**spec.__dict__, "num_classes": len(classes), "class_names": names})


def _check_name(name: str, root: Path | None, download: bool) -> None:
    """A timm dataset name this code reads (random access: ``torch/`` and ``hfds/``), with a
    root unless it may be downloaded."""
    prefix, _, rest = name.partition("/")
    known = prefix.lower() == "torch" and rest.lower() in _TORCH_NAMES
    if not (known or (prefix.lower() == "hfds" and rest)):
        raise DataError(
            f"unknown dataset {name!r}: give torch/NAME ({', '.join(_TORCH_NAMES[:6])}...) or "
            "hfds/NAME, or leave the name out for image folders and tars"
        )
    if root is None and not download:
        raise DataError(
            f"dataset {name!r} needs its root folder, where its files are (--data ROOT); "
            "nothing is downloaded"
        )


def _embedded() -> DataSpec:
    train, val = EMBEDDED_ROOT / "train.tar", EMBEDDED_ROOT / "validation.tar"
    if not (train.is_file() and val.is_file()):
        raise DataError(f"embedded Animal-MNIST missing in {EMBEDDED_ROOT}; reinstall an-search")
    return DataSpec(
        train_root=str(train),
        val_root=str(val),
        num_classes=10,
        class_names=(*_ANIMAL_CLASSES, "zebra"),
        mean=_ANIMAL_MEAN,
        std=_ANIMAL_STD,
        description="Animal-MNIST (embedded, 28x28 grayscale, 8000 train / 2000 validation)",
    )


def resolve_data(
    path: str | os.PathLike[str] | None = None,
    *,
    name: str = "",
    holdout: float = 0.2,
    seed: int = 0,
    download: bool = False,
) -> DataSpec:
    """Resolve a dataset argument into a checked `DataSpec` (see the module docstring).

    Args:
        path: a folder, a .tar, or a timm dataset root; None for the embedded Animal-MNIST.
        name: a timm dataset name with a prefix ("torch/cifar10", "hfds/..."); "" for folders.
        holdout: validation fraction when the data has no validation split (stratified).
        seed: seed of that split.
        download: allow timm/torchvision to download a missing named dataset.

    Raises:
        DataError: missing path, no images, fewer than 2 classes, unreadable dataset.
    """
    if path is None and not name:
        return _embedded()
    if path is not None and not str(path).strip():  # (an unset $DATA: not the current folder)
        raise DataError(
            "empty data path: give a folder of class folders or a .tar, or leave --data out "
            "for the embedded Animal-MNIST"
        )
    if not 0.0 < holdout < 1.0:
        raise DataError(f"holdout must be in (0, 1), got {holdout}; e.g. 0.2")
    root = None if path is None else Path(path).expanduser()
    if name:
        _check_name(name, root, download)
        spec = DataSpec(str(root or ""), str(root or ""), 0, name=name, download=download)
        return _check_classes(spec, f"{name} at {root}")
    if not root.exists():
        raise DataError(f"data path {str(root)!r} does not exist; give a folder of class folders")
    if root.is_file() and root.suffix.lower() in _PACKED:
        raise DataError(
            f"{root.name}: a compressed archive is not read (timm reads plain .tar): extract it, "
            "or pack it with `tar -cf`"
        )
    common = {"num_classes": 0, "split_seed": seed, "description": str(root)}
    train = _find(root, _TRAIN_NAMES) if root.is_dir() else None
    val = _find(root, _VAL_NAMES) if root.is_dir() else None
    if train is not None and val is not None:  # ImageNet layout: both splits given
        spec = DataSpec(str(train), str(val), **common)
    else:  # one pool of class folders (root, root/train or a .tar): hold out a stratified part
        pool = str(train or root)
        spec = DataSpec(pool, pool, holdout=holdout, **common)
    return _check_classes(spec, str(root))
