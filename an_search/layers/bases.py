"""Base norms of Attentive Normalization and the registry of norm classes it can replace.

A *base* is the affine-free normalisation inside an AttentiveNorm (``.norm``):

==================  ==============================  =============  ===========================
base                inner module (affine off)       layout         normalises over
==================  ==============================  =============  ===========================
``batchnorm``       ``nn.BatchNorm2d``              channels_first batch + positions, per C
``batchnorm1d``     ``nn.BatchNorm1d``              channels_first batch + positions, per C
``batchnorm3d``     ``nn.BatchNorm3d``              channels_first batch + positions, per C
``groupnorm``       ``nn.GroupNorm(G, C)``          channels_first groups of C, per sample
``layernorm``       ``nn.LayerNorm(C)``             channels_last  C, per position
``layernorm2d``     timm ``LayerNorm2d``            channels_first C, per position
``rmsnorm``         ``nn.RMSNorm(C)``               channels_last  C, per position (no centring)
``rmsnorm2d``       timm ``RmsNorm2d``              channels_first C, per position (no centring)
==================  ==============================  =============  ===========================

Replaceable classes are matched by EXACT type (never ``isinstance``): a subclass may add
behaviour (timm ``BatchNormAct2d`` adds drop + act, ``SplitBatchNorm2d`` adds auxiliary BNs)
that a silent swap would lose (DESIGN.md 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import evo_norm
from timm.layers import norm as timm_norm
from timm.layers import norm_act as timm_norm_act
from timm.layers.filter_response_norm import FilterResponseNormAct2d, FilterResponseNormTlu2d
from timm.layers.grn import GlobalResponseNorm
from timm.layers.inplace_abn import InplaceAbn
from timm.layers.split_batchnorm import SplitBatchNorm2d
from timm.models import metaformer
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from an_search.errors import UnknownNameError

__all__ = [
    "BASES",
    "NormSpec",
    "CHANNELS_LAST_BASES",
    "SUPPORTED_NORM_CLASSES",
    "UNSUPPORTED_NORM_CLASSES",
    "create_base_norm",
    "describe_norm",
    "is_supported_norm",
    "norm_kind",
    "resolve_base",
]

BASES: tuple[str, ...] = (
    "batchnorm",
    "batchnorm1d",
    "batchnorm3d",
    "groupnorm",
    "layernorm",
    "layernorm2d",
    "rmsnorm",
    "rmsnorm2d",
)
CHANNELS_LAST_BASES: frozenset[str] = frozenset({"layernorm", "rmsnorm"})
_SAME_NORM_OTHER_LAYOUT = {
    "layernorm": "layernorm2d",
    "layernorm2d": "layernorm",
    "rmsnorm": "rmsnorm2d",
    "rmsnorm2d": "rmsnorm",
}
_BN = {"batchnorm": nn.BatchNorm2d, "batchnorm1d": nn.BatchNorm1d, "batchnorm3d": nn.BatchNorm3d}

_TN, _TNA = timm_norm, timm_norm_act
SUPPORTED_NORM_CLASSES: dict[type[nn.Module], str] = {
    nn.BatchNorm1d: "batchnorm1d",
    nn.BatchNorm2d: "batchnorm",
    nn.BatchNorm3d: "batchnorm3d",
    nn.SyncBatchNorm: "batchnorm",
    _TNA.BatchNormAct2d: "batchnorm",
    _TNA.SyncBatchNormAct: "batchnorm",
    FrozenBatchNorm2d: "batchnorm",
    _TNA.FrozenBatchNormAct2d: "batchnorm",
    nn.GroupNorm: "groupnorm",
    _TN.GroupNorm: "groupnorm",
    _TN.GroupNorm1: "groupnorm",
    metaformer.GroupNorm1NoBias: "groupnorm",  # (MetaFormer v2's norms: timm's, bias None)
    _TNA.GroupNormAct: "groupnorm",
    _TNA.GroupNorm1Act: "groupnorm",
    nn.LayerNorm: "layernorm",
    _TN.LayerNorm: "layernorm",
    metaformer.LayerNormNoBias: "layernorm",
    _TN.LayerNormFp32: "layernorm",
    _TNA.LayerNormAct: "layernorm",
    _TNA.LayerNormActFp32: "layernorm",
    _TN.LayerNorm2d: "layernorm2d",
    metaformer.LayerNorm2dNoBias: "layernorm2d",
    _TN.LayerNorm2dFp32: "layernorm2d",
    _TN.LayerNormExp2d: "layernorm2d",
    _TNA.LayerNormAct2d: "layernorm2d",
    _TNA.LayerNormAct2dFp32: "layernorm2d",
    nn.RMSNorm: "rmsnorm",
    _TN.RmsNorm: "rmsnorm",
    _TN.RmsNormFp32: "rmsnorm",
    _TNA.RmsNormAct: "rmsnorm",
    _TNA.RmsNormActFp32: "rmsnorm",
    _TN.RmsNorm2d: "rmsnorm2d",
    _TN.RmsNorm2dFp32: "rmsnorm2d",
    _TNA.RmsNormAct2d: "rmsnorm2d",
    _TNA.RmsNormAct2dFp32: "rmsnorm2d",
}
# EvoNorm2d{B0..B2,S0..S2a}: every EvoNorm of timm (normalisation fused with its activation)
_EVO_NORMS = tuple(
    c for name, c in vars(evo_norm).items() if name.startswith("EvoNorm2d") and isinstance(c, type)
)
UNSUPPORTED_NORM_CLASSES: tuple[type[nn.Module], ...] = (
    *_EVO_NORMS,
    FilterResponseNormAct2d,
    FilterResponseNormTlu2d,
    GlobalResponseNorm,
    InplaceAbn,
    SplitBatchNorm2d,
    _TN.SimpleNorm,
    _TN.SimpleNorm2d,
    _TN.SimpleNormFp32,
    _TN.SimpleNorm2dFp32,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)
# Fp32 classes keep their float32 compute in the inner norm (affine off).
_FP32_INNER: dict[type[nn.Module], type[nn.Module]] = {
    _TN.LayerNormFp32: _TN.LayerNormFp32,
    _TNA.LayerNormActFp32: _TN.LayerNormFp32,
    _TN.LayerNorm2dFp32: _TN.LayerNorm2dFp32,
    _TNA.LayerNormAct2dFp32: _TN.LayerNorm2dFp32,
    _TN.RmsNormFp32: _TN.RmsNormFp32,
    _TNA.RmsNormActFp32: _TN.RmsNormFp32,
    _TN.RmsNorm2dFp32: _TN.RmsNorm2dFp32,
    _TNA.RmsNormAct2dFp32: _TN.RmsNorm2dFp32,
}


def norm_kind(module: nn.Module) -> str | None:
    """Base name an AttentiveNorm would use to replace ``module``; None if unsupported.

    LayerNorm/RMSNorm qualify only with a 1-D ``normalized_shape`` (a channel axis).
    """
    kind = SUPPORTED_NORM_CLASSES.get(type(module))
    if kind in ("layernorm", "layernorm2d", "rmsnorm", "rmsnorm2d"):
        if len(tuple(module.normalized_shape)) != 1:
            return None
    return kind


def is_supported_norm(module: nn.Module) -> bool:
    """True when :meth:`AttentiveNorm.from_norm` can replace ``module``."""
    return norm_kind(module) is not None


def resolve_base(base: str, layout: str | None) -> str:
    """Validate ``base`` and ``layout``; a LayerNorm/RMSNorm base follows the layout asked for.

    Raises:
        UnknownNameError: unknown base or layout, or a BatchNorm/GroupNorm with channels_last.
    """
    if base == "batchnorm2d":
        base = "batchnorm"
    if base not in BASES:
        raise UnknownNameError(f"unknown base norm {base!r}; use one of: {', '.join(BASES)}")
    if layout is None:
        return base
    if layout not in ("channels_first", "channels_last"):
        raise UnknownNameError(
            f"unknown layout {layout!r}; use one of: channels_first, channels_last"
        )
    if (layout == "channels_last") == (base in CHANNELS_LAST_BASES):
        return base
    if base in _SAME_NORM_OTHER_LAYOUT:
        return _SAME_NORM_OTHER_LAYOUT[base]
    raise UnknownNameError(f"base {base!r} needs layout 'channels_first', not {layout!r}")


def create_base_norm(
    base: str,
    channels: int,
    eps: float | None,
    momentum: float | None = 0.1,
    num_groups: int = 32,
    track_running_stats: bool = True,
    frozen: bool = False,
    source: type[nn.Module] | None = None,
) -> nn.Module:
    """Build the affine-free inner norm of an AttentiveNorm.

    Args:
        base: a name of :data:`BASES`.
        channels: C.
        eps: the norm's epsilon (None only for ``nn.RMSNorm``: dtype epsilon).
        momentum: BatchNorm running-stat momentum (None: cumulative average).
        num_groups: GroupNorm groups.
        track_running_stats: BatchNorm keeps running statistics.
        frozen: BatchNorm with fixed statistics (torchvision ``FrozenBatchNorm2d``).
        source: class of the norm being replaced; selects Fp32 and SyncBatchNorm variants.
    """
    if base in _BN:
        if frozen:
            return FrozenBatchNorm2d(channels, eps=eps)
        cls = nn.SyncBatchNorm if source in (nn.SyncBatchNorm, _TNA.SyncBatchNormAct) else _BN[base]
        return cls(channels, eps, momentum, affine=False, track_running_stats=track_running_stats)
    if base == "groupnorm":
        return nn.GroupNorm(num_groups, channels, eps=eps, affine=False)
    if source in _FP32_INNER:
        return _FP32_INNER[source](channels, eps=eps, affine=False)
    if base == "layernorm":
        return nn.LayerNorm(channels, eps=eps, elementwise_affine=False)
    if base == "layernorm2d":
        return _TN.LayerNorm2d(channels, eps=eps, affine=False)
    if base == "rmsnorm":
        return nn.RMSNorm(channels, eps=eps, elementwise_affine=False)
    return _TN.RmsNorm2d(channels, eps=eps, affine=False)


@dataclass(frozen=True)
class NormSpec:
    """What an AttentiveNorm needs to know about the norm module it replaces."""

    base: str
    channels: int
    eps: float | None
    momentum: float | None
    num_groups: int
    track_running_stats: bool
    frozen: bool
    weight: torch.Tensor | None  # (C,) affine weight (a buffer for frozen BN), None if absent
    bias: torch.Tensor | None
    act: nn.Module | None  # kept by the AN (timm *Act norms)
    drop: nn.Module | None


def describe_norm(module: nn.Module) -> NormSpec:
    """Read the configuration of a supported norm module.

    Raises:
        UnknownNameError: ``module`` is not a supported norm (see :func:`is_supported_norm`).
    """
    base = norm_kind(module)
    if base is None:
        names = sorted({c.__name__ for c in SUPPORTED_NORM_CLASSES})
        raise UnknownNameError(
            f"cannot convert {type(module).__name__} to AttentiveNorm; "
            f"supported norm classes: {', '.join(names)}"
        )
    if base in _BN:
        channels = module.weight.shape[0] if module.weight is not None else module.num_features
    elif base == "groupnorm":
        channels = module.num_channels
    else:
        channels = tuple(module.normalized_shape)[0]
    frozen = isinstance(module, (FrozenBatchNorm2d, _TNA.FrozenBatchNormAct2d))
    return NormSpec(
        base=base,
        channels=channels,
        eps=module.eps,
        momentum=getattr(module, "momentum", 0.1),
        num_groups=getattr(module, "num_groups", 32),
        track_running_stats=getattr(module, "running_mean", None) is not None,
        frozen=frozen,
        weight=getattr(module, "weight", None),
        bias=getattr(module, "bias", None),
        act=getattr(module, "act", None),
        drop=getattr(module, "drop", None),
    )
