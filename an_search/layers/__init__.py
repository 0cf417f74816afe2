"""Attentive Normalization layers: the composite layer, attention heads, pools, base norms."""

from __future__ import annotations

from .attentive_norm import AttentionWeights, AttentiveNorm
from .bases import (
    BASES,
    SUPPORTED_NORM_CLASSES,
    UNSUPPORTED_NORM_CLASSES,
    is_supported_norm,
    norm_kind,
)
from .convert import (
    NORM_CLASSES,
    an_param_delta,
    convert_sync_batchnorm,
    fold_sites,
    no_weight_decay_names,
)
from .folded import FoldedAttentiveNorm
from .heads import HEADS, create_head, head_param_count
from .pooling import POOLS, create_pool

__all__ = [
    "BASES",
    "HEADS",
    "NORM_CLASSES",
    "POOLS",
    "SUPPORTED_NORM_CLASSES",
    "UNSUPPORTED_NORM_CLASSES",
    "AttentionWeights",
    "AttentiveNorm",
    "FoldedAttentiveNorm",
    "an_param_delta",
    "convert_sync_batchnorm",
    "create_head",
    "create_pool",
    "fold_sites",
    "head_param_count",
    "is_supported_norm",
    "no_weight_decay_names",
    "norm_kind",
]
