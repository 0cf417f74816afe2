"""Tar datasets scanned once per process.

timm's ``ReaderImageInTar`` reads every member header of the tar to index it: 0.4 s for the
embedded 8000 images, minutes for an ImageNet tar. A search opens its splits for every trial
(and the checks before it), so each opened tar dataset is kept, keyed by the file's identity
(path, inode, size, mtime, ctime: a rewritten tar is scanned again), and handed out as a copy
with its own transform and its own open-file state; the index (immutable once cleaned) is shared.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from timm.data.readers.reader_image_in_tar import ReaderImageInTar, TarState

__all__ = ["tar_key", "opened"]

_KEEP = 6  # (a dataset's train split and validation split, the latter opened with the training
# classes and, to check them, without: two datasets' worth)
_CACHE: OrderedDict[Hashable, Any] = OrderedDict()
_LOCK = threading.Lock()


def tar_key(root: str, *settings: Hashable) -> Hashable | None:
    """The cache key of a ``.tar`` file ``root`` opened with ``settings``; None for anything else
    (folders are not kept: nothing cheap tells that a tree has not changed)."""
    if os.path.splitext(root)[1] != ".tar" or not os.path.isfile(root):
        return None
    st = os.stat(root)
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # (ctime: any
    # write or utime changes it, however the mtime is set back)
    return (os.path.realpath(root), *stamp, *settings)


def opened(key: Hashable | None, open_fn: Callable[[], Any]) -> Any:
    """``open_fn()``'s dataset, or a copy of the one kept under ``key`` (None: never kept)."""
    if key is None:
        return open_fn()
    with _LOCK:
        kept = _CACHE.get(key)
        if kept is not None:
            _CACHE.move_to_end(key)
    if kept is None:
        kept = open_fn()
        if not isinstance(getattr(kept, "reader", None), ReaderImageInTar):
            return kept
        with _LOCK:
            _CACHE[key] = kept
            while len(_CACHE) > _KEEP:
                _CACHE.popitem(last=False)
    return _copy(kept)


def _copy(ds: Any) -> Any:
    """``ds`` with its own transform and reader; the reader's tar files not yet opened."""
    out = copy.copy(ds)
    out.reader = reader = copy.copy(ds.reader)
    if reader.root_is_tar:
        reader.tar_state = _closed(reader.tar_state)
    else:
        reader.tar_state = {name: _closed(state) for name, state in reader.tar_state.items()}
    return out


def _closed(state: TarState) -> TarState:
    fresh = TarState(ti=state.ti)
    fresh.children = {name: _closed(child) for name, child in state.children.items()}
    return fresh
