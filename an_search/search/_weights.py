"""The weights a study's trials start from: stored with the study, compared on resume.

A study's results depend on its starting weights as much as on its data: trials from
pretrained weights and from random init do not compare, and a configuration that matches an
earlier trial reuses that trial's result. So the checkpoint's content (SHA-256 and size, not its
path, which may differ on another machine) is stored, and a resume from other weights refused.
"""

from __future__ import annotations

import os
from typing import Any

import optuna

from an_search._digest import file_sha256
from an_search.errors import CheckpointError, StorageError

__all__ = ["check_same_weights", "study_checkpoint", "weights_summary"]


def weights_summary(checkpoint: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """What identifies ``checkpoint``'s content: ``{"sha256", "bytes", "file"}`` (None: none).

    Raises:
        CheckpointError: the file cannot be read.
    """
    if checkpoint is None:
        return None
    path = os.fspath(checkpoint)
    try:
        sha256 = file_sha256(path)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read ({exc.strerror or exc}): pass an existing "
            "weights file"
        ) from None
    return {"sha256": sha256, "bytes": os.path.getsize(path), "file": path}


def check_same_weights(study: optuna.Study, weights: dict[str, Any] | None) -> None:
    """A resumed study must start its trials from the same weights (any path to them).

    A study from before the weights were stored (no ``weights`` attribute) is not compared.

    Raises:
        StorageError: the study's trials started from other weights, or from none.
    """
    attrs = study.user_attrs
    if "weights" not in attrs:
        return
    stored = attrs["weights"]
    same = (stored or {}).get("sha256") == (weights or {}).get("sha256")
    if same:
        return
    raise StorageError(
        f"study {study.study_name!r} starts its trials from {_describe(stored)}, this call "
        f"from {_describe(weights)}: resume it with the same --checkpoint (its path may "
        "differ), or start another study (--study-name or --output)"
    )


def study_checkpoint(study: optuna.Study) -> str | None:
    """The weights file ``study``'s trials started from, on this machine (None: random init).

    It is the path the study stored, checked to hold the same content (a study from before
    the content was stored: the path, if it is there).

    Raises:
        CheckpointError: the file is not on this machine, or holds other weights now.
    """
    weights = study.user_attrs.get("weights")
    path = (study.user_attrs.get("config") or {}).get("checkpoint")
    if "weights" not in study.user_attrs:
        return path if path and os.path.isfile(path) else None
    if not weights:
        return None
    path = path or weights.get("file")
    if not path or not os.path.isfile(path):
        raise CheckpointError(
            f"the study's trials started from {_describe(weights)}, which is not at "
            f"{str(path)!r} on this machine: give its path here with --checkpoint"
        )
    if file_sha256(path) != weights.get("sha256"):
        raise CheckpointError(
            f"{path!r} no longer holds the weights the study's trials started from "
            f"({_describe(weights)}): give those with --checkpoint"
        )
    return path


def _describe(weights: dict[str, Any] | None) -> str:
    if not weights:
        return "random init (no --checkpoint)"
    name = os.path.basename(str(weights.get("file", "")))
    return f"{name!r} (sha256 {str(weights.get('sha256'))[:12]})"
