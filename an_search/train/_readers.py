"""timm's folder and tar readers, made safe: hidden entries out, ambiguous classes refused.

timm's ``ReaderImageFolder`` and ``ReaderImageInTar`` walk the whole tree, keep every file with an
image extension and label it by its leaf folder. So a Jupyter ``.ipynb_checkpoints/`` folder became
a class, macOS's ``._x.png`` AppleDouble files were samples that fail to decode, and
``cat/2019/`` and ``dog/2019/`` were one class, ``2019``, without a word.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image
from timm.data.readers import img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.data.readers.reader_image_in_tar import ReaderImageInTar
from timm.utils.misc import natural_key

from an_search.errors import DataError

__all__ = ["EXTRA_EXTENSIONS", "clean_reader", "more_image_extensions"]


class _Once(logging.Filter):
    """Lets each distinct message through once per process: timm's dataset logs "Skipped
    sample (index 40). cannot identify image file ..." each time an unreadable image is drawn,
    so every epoch of every trial (with -q too) repeated it."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        with self._lock:
            new = text not in self._seen
            self._seen.add(text)
        return new


_TIMM_DATASET_LOG = logging.getLogger("timm.data.dataset")
if not any(isinstance(f, _Once) for f in _TIMM_DATASET_LOG.filters):
    _TIMM_DATASET_LOG.addFilter(_Once())

#: Image files read besides timm's own .png, .jpg and .jpeg (which alone timm's readers keep:
#: a folder of .webp images was read as empty, a mixed one in part, without a word).
EXTRA_EXTENSIONS = (".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".ppm", ".pgm", ".pnm")


_EXTENSIONS_LOCK = threading.RLock()


@contextmanager
def more_image_extensions() -> Iterator[None]:
    """timm's image extensions widened by those of :data:`EXTRA_EXTENSIONS` that this PIL
    decodes, while a dataset is indexed; timm's setting is put back afterwards."""
    with _EXTENSIONS_LOCK:  # (timm's setting is the process's: one indexing at a time)
        before = img_extensions.get_img_extensions()
        readable = Image.registered_extensions()
        img_extensions.add_img_extensions(
            [e for e in EXTRA_EXTENSIONS if e in readable and e not in before]
        )
        try:
            yield
        finally:
            img_extensions.set_img_extensions(before)


def clean_reader(ds: Any, root: str, *, fixed_classes: bool) -> None:
    """Drop hidden entries from ``ds``'s reader and refuse ambiguous class folders, in place.

    Args:
        ds: a dataset from ``timm.data.create_dataset`` (other readers are left alone).
        root: where it was read from (for messages).
        fixed_classes: the class map was given (a validation split takes the training one):
            keep its indices; else classes left without samples go and the rest are renumbered.

    Raises:
        DataError: one class name from two folders, or images at two depths of one tree.
    """
    reader = getattr(ds, "reader", None)
    if isinstance(reader, ReaderImageFolder):
        paths = [os.path.relpath(path, reader.root) for path, _ in reader.samples]
        targets = np.asarray([t for _, t in reader.samples], dtype=np.int64)
        names = reader.class_to_idx
    elif isinstance(reader, ReaderImageInTar):
        paths = [_tar_path(*sample) for sample in reader.samples]
        targets = np.asarray(reader.targets, dtype=np.int64)
        names = reader.class_name_to_idx
    else:
        return
    keep = np.asarray([not _hidden(p) for p in paths], dtype=bool)
    _check_folders([p for p, k in zip(paths, keep, strict=True) if k], names, root)
    if keep.all():
        return
    classes = dict(names)
    if not fixed_classes:
        kept = {int(t) for t in targets[keep]}
        left = sorted((n for n, i in names.items() if i in kept), key=natural_key)
        classes = {n: i for i, n in enumerate(left)}
    remap = {names[n]: classes[n] for n in classes}
    new = np.asarray([remap.get(int(t), -1) for t in targets], dtype=np.int64)  # -1: not kept
    if isinstance(reader, ReaderImageFolder):
        pairs = zip(reader.samples, new, keep, strict=True)
        samples = [(path, int(t)) for (path, _), t, k in pairs if k]
        reader.samples, reader.class_to_idx = samples, classes
    else:
        reader.samples, reader.targets = reader.samples[keep], new[keep]
        reader.class_name_to_idx = classes
        reader.class_idx_to_name = {i: n for n, i in classes.items()}


def _tar_path(member: Any, tar_name: str | None, child: Any) -> str:
    parts = [tar_name or "", child.name if child is not None else "", member.path]
    return os.path.normpath(os.path.join(*[p for p in parts if p]))  # ("./cat/0.png": cat/0.png)


def _hidden(path: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in path.split(os.sep))


def _check_folders(paths: list[str], names: dict[str, int], root: str) -> None:
    folders: dict[str, str] = {}  # class name -> the folder that gave it
    dirs = {os.path.dirname(p) for p in paths} - {""}  # (images at the root: data.py says so)
    for folder in sorted(dirs):
        label = os.path.basename(folder)
        if label in folders and label in names:
            raise DataError(
                f"class folders {folders[label]!r} and {folder!r} in {root} both give class "
                f"{label!r}; put each class's images in one folder: root/<class>/<image>"
            )
        folders[label] = folder
        parent = os.path.dirname(folder)
        while parent:
            if parent in dirs:
                raise DataError(
                    f"images at two depths in {root}: {parent!r} and {folder!r}; put each "
                    "class's images in one folder: root/<class>/<image>"
                )
            parent = os.path.dirname(parent)
