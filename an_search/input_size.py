"""Input sizes: what a model takes, and why a forward failed when the input is to blame
(too small for its downsampling, too big for the machine, a size a plain timm model does not
take)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._modes import eval_mode
from .errors import ModelConfigError

__all__ = [
    "SHAPE_ERRORS",
    "check_input_fits",
    "failure_reason",
    "input_error",
    "input_too_small",
    "model_input_size",
]


def model_input_size(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """The (C, H, W) the model expects: ``img_size`` if given, else its pretrained_cfg's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    in_chans = getattr(model, "in_chans", None) or c
    if img_size is not None:
        return (in_chans, img_size, img_size)
    return (in_chans, h, w)


def _downsampling(model: nn.Module) -> int:
    """The model's total downsampling (timm's ``feature_info`` reduction; 0: unknown)."""
    info = getattr(model, "feature_info", None)
    reductions = [f.get("reduction", 0) for f in info if isinstance(f, dict)] if info else []
    return max(reductions, default=0)


def _side(input_size: Sequence[int]) -> str:
    """``(C, H, W)`` as ``HxW``."""
    return "x".join(map(str, input_size[1:]))


def failure_reason(exc: BaseException) -> str:
    """The failure's type and first line (at most 200 characters; empty messages too)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def input_too_small(
    model: nn.Module, input_size: Sequence[int], exc: Exception
) -> ModelConfigError | None:
    """The error to raise for ``exc``, a forward's failure on an input (C, H, W) smaller than
    the model's downsampling; None when that cannot be why."""
    need = _downsampling(model)
    if len(input_size) < 3 or min(input_size[1:]) >= need:
        return None
    return ModelConfigError(
        f"a {_side(input_size)} input is too small for this model, which downsamples {need}x "
        f"({failure_reason(exc)}): give a larger --img-size, {need} or more"
    )


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (CPU or CUDA)."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text)
    )


#: What a forward raises on an input it cannot take: torch's RuntimeError, and the asserts and
#: indexing of timm's models built for other grids (Twins, NesT, MaxViT, MViTv2).
SHAPE_ERRORS = (RuntimeError, AssertionError, IndexError)


def input_error(
    model: nn.Module,
    input_size: Sequence[int],
    exc: Exception,
    *,
    batch: int = 1,
    plain: bool = False,
) -> ModelConfigError | None:
    """The error to raise for ``exc``, a forward that failed on a ``batch`` of ``input_size``
    (C, H, W), when the input is to blame: too little memory for it, an input smaller than the
    model's downsampling, or (``plain``: a timm model without AN) a size other than its
    default (a ViT-like model's grids: CrossViT built for 32 px runs no input at all). None
    otherwise (a model failing at its own default size, or with AN): a bug, shown as it is."""
    side, reason = _side(input_size), failure_reason(exc)
    if _out_of_memory(exc):
        return ModelConfigError(
            f"a batch of {batch} at {side} needs more memory than this machine has ({reason}): "
            "give a smaller --img-size"
        )
    if not isinstance(exc, SHAPE_ERRORS):
        return None
    too_small = input_too_small(model, input_size, exc)
    cfg = getattr(model, "pretrained_cfg", None)
    if too_small is not None or not plain or not isinstance(cfg, dict) or "input_size" not in cfg:
        return too_small
    default = model_input_size(model)
    if tuple(input_size[1:]) == default[1:]:
        return None
    return ModelConfigError(
        f"this model fails on a {side} input ({reason}): it may not take that size; give its "
        f"default, --img-size {default[1]}, or another size it takes"
    )


def check_input_fits(model: nn.Module, input_size: Sequence[int]) -> None:
    """Run one batch-1 forward (eval mode, no grad, modes put back) where the input is smaller
    than the model's downsampling, the only inputs that may not fit.

    Raises:
        ModelConfigError: the model cannot run an input of that size.
    """
    if len(input_size) < 3 or min(input_size[1:]) >= _downsampling(model):
        return
    ref = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=ref.device if ref is not None else None)
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except RuntimeError as exc:
        too_small = input_too_small(model, input_size, exc)
        if too_small is None:
            raise
        raise too_small from None
