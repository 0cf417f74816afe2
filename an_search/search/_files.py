"""Directories and atomic file writes for run directories, reports and exports."""

from __future__ import annotations

from pathlib import Path

from an_search._atomic import replacing
from an_search.errors import OutputDirError

__all__ = ["atomic_write", "make_dir"]


def make_dir(path: Path) -> Path:
    """Create ``path`` and its parents.

    Raises:
        OutputDirError: it cannot be created.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"directory cannot be created ({exc.strerror}): {path}") from None
    return path


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one.

    Raises:
        OutputDirError: the directory cannot be written.
    """
    try:
        with replacing(path) as tmp:
            Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        raise OutputDirError(
            f"directory cannot be written ({exc.strerror}): {path.parent}"
        ) from None
    return path
