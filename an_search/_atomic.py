"""Atomic file replacement: write a temporary file beside the target, then rename it over.

A crash or an error leaves either the old file or the new one, never half of one, and no
temporary behind. Used for saved models, checkpoints, reports and the built C kernels.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replacing"]


@contextmanager
def replacing(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary is deleted and ``path`` is
    untouched. Raises OSError when the directory cannot be written.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
