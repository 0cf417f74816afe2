"""Build timm models by name, optionally with weights from a local checkpoint file.

No hub downloads: ``pretrained=False`` always; weights come from a file the user names
(safetensors, or a ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``).
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch
from torch import nn

from ._compat import filter_torchscript_warning
from .errors import CheckpointError, UnknownModelError

__all__ = ["create_model", "load_checkpoint", "model_input_size"]

filter_torchscript_warning()


def _suggest(name: str) -> str:
    import timm

    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(close)}?"
    return "run `python -c 'import timm; print(timm.list_models(\"*res*\"))'` to list names"


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model (random init) and load a local checkpoint if one is named.

    Args:
        name: timm model name, with or without a pretrained tag (``resnet50.a1_in1k``).
        num_classes: classifier size; a checkpoint with another classifier keeps its other weights.
        in_chans: input channels.
        img_size: input size for models that take one at construction (ViT-like); ignored by
            models that do not accept it.
        checkpoint: local weights file, safetensors or a torch pickle read with weights_only.
        **kwargs: passed to ``timm.create_model``.

    Raises:
        UnknownModelError: ``name`` is not a timm model.
        CheckpointError: the file is missing, unreadable, or does not match the model.
    """
    import timm

    if not timm.is_model(name):
        raise UnknownModelError(f"unknown timm model {name!r}: {_suggest(name)}")
    opts = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    opts = {k: v for k, v in opts.items() if v is not None}
    if img_size is not None:
        try:
            model = timm.create_model(name, pretrained=False, img_size=img_size, **opts)
        except TypeError:
            model = timm.create_model(name, pretrained=False, **opts)
    else:
        model = timm.create_model(name, pretrained=False, **opts)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load weights into ``model`` strictly, dropping a classifier whose shape differs.

    Raises:
        CheckpointError: missing, corrupt or mismatched file (message names the fix).
    """
    from timm.models import load_state_dict

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: pass an existing weights file")
    try:
        state = load_state_dict(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means an unreadable file
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read ({reason}): pass a safetensors file or a "
            "torch state_dict saved with torch.save"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path!r} holds no state_dict of tensors: re-save it")
    own = model.state_dict()
    head = _classifier_keys(model)
    for key in head:
        if key in state and key in own and state[key].shape != own[key].shape:
            del state[key]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(
            f"checkpoint {path!r} does not match {type(model).__name__}: {'; '.join(parts)}; "
            "check the model name, --num-classes and --img-size"
        )
    model.load_state_dict(state, strict=False)


def _classifier_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    own = model.state_dict()
    return {k for k in own for n in names if k.startswith(n + ".")}


def model_input_size(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """The (C, H, W) the model expects: ``img_size`` if given, else its pretrained_cfg's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    in_chans = getattr(model, "in_chans", None) or c
    if img_size is not None:
        return (in_chans, img_size, img_size)
    return (in_chans, h, w)
