"""Per-epoch training checkpoints: plain state dicts, written atomically, read weights-only.

One file, ``<checkpoint_dir>/last.pth``, holds the model, optimizer, scheduler and EMA state
dicts, the last finished epoch, the update count and the per-epoch history. It is written to a
temporary file in the same folder and renamed over the old one, so a crash mid-write leaves the
previous checkpoint intact. It is read with ``torch.load(weights_only=True)``: no pickled code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from an_search._atomic import replacing
from an_search.errors import CheckpointError, OutputDirError

__all__ = ["CHECKPOINT_NAME", "check_writable", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "last.pth"


def save_checkpoint(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write `state` (tensors, state dicts, numbers, strings, lists) to directory/last.pth.

    Raises:
        OutputDirError: the directory cannot be created or written.
    """
    directory = Path(directory)
    path = directory / CHECKPOINT_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise _unwritable(directory, e) from e
    return path


def check_writable(directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` (and its parents) and check that a file can be written in it, before
    any training, which would otherwise find out only at its first checkpoint.

    Raises:
        OutputDirError: it cannot be created or written.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise _unwritable(directory, e) from e


def _unwritable(directory: Path, e: OSError) -> OutputDirError:
    return OutputDirError(
        f"cannot write checkpoints to {directory} ({e.strerror or e}): choose a writable "
        "output directory"
    )


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read directory/last.pth, or return None when there is none yet.

    Raises:
        CheckpointError: the file exists but cannot be read as a checkpoint.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(e).__name__}); delete it to start over"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not an an-search training checkpoint; delete it")
    return state
