"""Model-level helpers around AttentiveNorm: cost delta, SyncBatchNorm, weight-decay names, the
folded form for inference."""

from __future__ import annotations

import copy
from typing import Any

from timm.layers import convert_sync_batchnorm as _timm_convert_sync_batchnorm
from torch import nn

from .attentive_norm import AttentiveNorm
from .bases import SUPPORTED_NORM_CLASSES, UNSUPPORTED_NORM_CLASSES, describe_norm
from .heads import head_param_count

__all__ = [
    "NORM_CLASSES",
    "an_param_delta",
    "convert_sync_batchnorm",
    "fold_sites",
    "no_weight_decay_names",
]

#: Every norm class a tracer should keep as a leaf: supported, unsupported, and AttentiveNorm
#: itself (``is_supported_norm`` is False for AttentiveNorm: it is never converted again).
NORM_CLASSES: tuple[type[nn.Module], ...] = (
    *SUPPORTED_NORM_CLASSES,
    *UNSUPPORTED_NORM_CLASSES,
    AttentiveNorm,
)


def _affine_params(norm: nn.Module | Any) -> tuple[int, int]:
    """(channels, learnable affine parameters) of a norm module or a site-like record."""
    if isinstance(norm, nn.Module):
        spec = describe_norm(norm)
        own = [p for name, p in norm.named_parameters(recurse=False) if name in ("weight", "bias")]
        return spec.channels, sum(p.numel() for p in own)
    channels, base = int(norm.channels), str(norm.base)
    if not norm.affine:
        return channels, 0
    return channels, channels if base.startswith("rmsnorm") else 2 * channels


def an_param_delta(norm: nn.Module | Any, k: int, head: str = "default") -> int:
    """Parameters added by replacing ``norm`` with a K-mixture AttentiveNorm, without building it.

    ``2*K*C`` (Gamma, Beta) + the head's parameters - the norm's own affine parameters. For the
    default head on an affine BatchNorm: ``3*K*C + 2*K - 2*C``. Running buffers are not counted.

    Args:
        norm: a supported norm module, or a site-like record with ``channels``, ``base`` and
            ``affine`` attributes (``an_search.rewrite.Site``).
        k: number of mixtures.
        head: attention head name.

    Raises:
        UnknownNameError: unsupported norm class or unknown head.
    """
    channels, affine = _affine_params(norm)
    return 2 * k * channels + head_param_count(head, channels, k) - affine


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Convert every BatchNorm (timm ``BatchNormAct2d`` included) to its synchronised form.

    AttentiveNorm is a composite, so the conversion rebuilds only its inner ``.norm`` (and the
    BatchNorm of its head) as ``SyncBatchNorm``; Gamma, Beta and the head are kept as they are.
    An AN whose inner norm is a ``SyncBatchNorm`` takes its reference path, so the batch
    statistics are all-reduced across ranks by ``SyncBatchNorm`` itself (the fused single-pass
    statistics would be per-rank). Returns the converted module (a new object if ``model`` is
    itself a BatchNorm), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    return _timm_convert_sync_batchnorm(model, process_group)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Qualified names of the AN mixture parameters (``<site>.weight``, ``<site>.bias``).

    timm's optimizer factory decays every parameter with ndim > 1 except names ending in
    ``.bias``; return this set from a model's ``no_weight_decay()`` to exempt Gamma and Beta.
    """
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, AttentiveNorm):
            prefix = f"{name}." if name else ""
            names.update({f"{prefix}weight", f"{prefix}bias"})
    return names


def fold_sites(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` for inference: every AttentiveNorm with a folded form replaced by its
    :class:`~.folded.FoldedAttentiveNorm` (``AttentiveNorm.fuse()``), nothing else touched; a
    copy unless ``inplace``. ``timm.utils.reparameterize_model`` folds the sites too, but also
    fuses timm's own reparameterizable blocks, whose ``fuse()`` fails where an AN site took the
    place of the BatchNorm it folds into a convolution (RepVGG, MobileOne, FastViT, LeViT,
    EfficientViT-MSRA, RepGhost: AN's per-sample scale has no convolution form)."""
    if isinstance(model, AttentiveNorm):
        return model.fuse()
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AttentiveNorm):
                setattr(parent, name, child.fuse())
    return model
