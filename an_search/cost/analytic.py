"""Analytic cost of one Attentive Normalization site, without building or tracing anything.

:func:`an_site_macs` is what :func:`~an_search.cost.count_cost` reports for one AN module in
``by_module`` (eval mode, conventions of :mod:`an_search.cost.handles`), written out from the
layer's forward: shared moments (3 per element), pooled statistic, head, the two (B, K) @ (K, C)
mixing matmuls, the inner normalisation folded into a per-(sample, channel) scale and shift, and
the one-pass affine (2 per element). ``an_param_delta`` (re-exported from
:mod:`an_search.layers`) gives the parameters the same site adds.
"""

from __future__ import annotations

from collections.abc import Callable

from an_search.errors import UnknownNameError
from an_search.layers import an_param_delta

__all__ = ["an_param_delta", "an_site_macs"]

# Per sample, from the pooled statistic (C) to the K mixture weights; fvcore counts linear
# layers as C_in * C_out (bias free), eval BatchNorm with affine 2, GroupNorm with affine 5.
_HEAD_MACS: dict[str, Callable[[int, int], int]] = {
    "default": lambda c, k: c * k + 2 * k + k,  # linear, BN_K, hard-sigmoid
    "linear-sigmoid": lambda c, k: c * k + k,
    "linear-hsigmoid": lambda c, k: c * k + k,
    "bn-sigmoid": lambda c, k: c * k + 2 * k + k,
    "bn-softmax": lambda c, k: c * k + 2 * k + k,
    "gn-hsigmoid": lambda c, k: c * k + 5 * k + k,
    "mlp": lambda c, k: c * 2 * k + 2 * k + 2 * k * k + k,  # fc1, relu, fc2, sigmoid
    "mlp-bn": lambda c, k: c * 2 * k + 2 * 2 * k + 2 * k + 2 * k * k + 2 * k + k,
}

_BATCHNORMS = ("batchnorm", "batchnorm1d", "batchnorm3d")
_BASES = (*_BATCHNORMS, "groupnorm", "layernorm", "layernorm2d", "rmsnorm", "rmsnorm2d")


def _pool_macs(pool: str, c: int, n: int) -> int:
    """Per sample, from the moments (mean and variance per channel) to the (C,) statistic."""
    if pool == "meanstd":  # var * n/(n-1), + eps, rsqrt, mean * rsqrt
        return 4 * c
    if pool == "avg":  # the mean itself
        return 0
    if pool == "avgmax":  # amax over positions, mean + max, halve
        return c * n + 2 * c
    raise UnknownNameError(f"unknown pool {pool!r}; use one of: meanstd, avg, avgmax")


def _norm_macs(base: str, c: int, n: int, groups: int) -> tuple[int, int]:
    """(per sample, per batch) MACs of normalisation + affine, after the shared moments."""
    if base in _BATCHNORMS:  # running stats: scale = gamma * rsqrt(var + eps), shift = beta - ..
        return 3 * c + 2 * c * n, 2 * c
    if base == "groupnorm":  # group mean and variance (law of total variance), then the fold
        return 5 * c + groups + 5 * c + 2 * c * n, 0
    if base in ("layernorm", "layernorm2d", "rmsnorm"):  # fvcore's rule: 4 per element
        return 4 * c * n + 2 * c * n, 0
    if base == "rmsnorm2d":  # timm's plain ops: x^2, mean over C, +eps, rsqrt, x * rsqrt
        return 3 * c * n + 2 * n + 2 * c * n, 0
    raise UnknownNameError(f"unknown base norm {base!r}; use one of: {', '.join(_BASES)}")


def an_site_macs(
    channels: int,
    spatial_numel: int,
    k: int,
    head: str = "default",
    pool: str = "meanstd",
    batch: int = 1,
    *,
    base: str = "batchnorm",
    num_groups: int = 32,
) -> int:
    """MACs of one AttentiveNorm in eval mode, as :func:`count_cost` counts them.

    Follows the layer's default path: fused statistics for BatchNorm (with running statistics,
    as every converted BN has) and GroupNorm bases, the inner norm module for the others. The
    eval-mode affine BN it replaces costs ``2 * batch * channels * spatial_numel`` MACs.

    Args:
        channels: C.
        spatial_numel: positions per channel (H * W; 1 for a (B, C) input).
        k: mixture components K.
        head: attention head name.
        pool: pooled statistic name.
        batch: batch size B.
        base: base norm name of the AN (see ``an_search.layers.BASES``).
        num_groups: groups of a ``groupnorm`` base.

    Returns:
        MACs (one multiply-add = 1).

    Raises:
        UnknownNameError: unknown head, pool or base.
    """
    if head not in _HEAD_MACS:
        names = ", ".join(_HEAD_MACS)
        raise UnknownNameError(f"unknown attention head {head!r}; use one of: {names}")
    c, n = channels, spatial_numel
    per_sample_norm, per_batch = _norm_macs(base, c, n, num_groups)
    moments = 3 * c * n  # per-channel mean and variance (one var_mean: sum, square, sum)
    mixing = 2 * k * c  # lam @ Gamma, lam @ Beta
    per_sample = moments + _pool_macs(pool, c, n) + _HEAD_MACS[head](c, k) + mixing
    return batch * (per_sample + per_sample_norm) + per_batch
