"""Pooled statistics that feed Attentive Normalization's attention head.

Paper: Li, Sun, Wu, "Attentive Normalization", ECCV 2020, arXiv 1908.01259. The attention head
sees one statistic per (sample, channel), pooled over every axis except batch and channel:

- ``meanstd`` (paper default): ``mean(x) / sqrt(var(x) + 1e-3)``, ``var`` UNBIASED (n - 1); a
  single position (n = 1) has variance 0.
- ``avg``: ``mean(x)`` (SE-style squeeze).
- ``avgmax``: ``0.5 * (mean(x) + max(x))``; averaged, not concatenated, as timm's
  ``adaptive_avgmax_pool2d``, so the head still sees C features and its size does not change.

All pools are computed from the per-(sample, channel) mean and variance of
:func:`~._fused.moments`, so that the AttentiveNorm fast path reuses that one reduction for the
normalisation statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from an_search.errors import UnknownNameError

from . import _fused
from ._autograd import first_order
from ._fused import bessel, moments, spatial_view
from ._native_bc import native_meanstd, native_meanstd_grad

__all__ = ["POOLS", "AvgMaxPool", "AvgPool", "MeanStdPool", "create_pool"]


class _Pool(nn.Module):
    """Base: (B, C, *) or (B, *, C) -> (B, C); subclasses implement :meth:`from_moments`."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x3 = spatial_view(x, self.channels_last)  # (B, C, n) or (B, n, C)
        mean, var = moments(x3, self.channels_last)  # (B, C) each
        return self.from_moments(mean, var, x3)

    def from_moments(self, mean: torch.Tensor, var: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """Statistic from per-(sample, channel) ``mean`` and biased ``var`` of the view ``x3``."""
        raise NotImplementedError

    def _n(self, x3: torch.Tensor) -> int:
        return x3.shape[1] if self.channels_last else x3.shape[2]

    def extra_repr(self) -> str:
        return f"channels_last={self.channels_last}"


class _MeanStd(torch.autograd.Function):
    """``mean * rsqrt(var * bessel + eps)`` as one autograd node (its backward is analytic)."""

    @staticmethod
    def forward(ctx, mean, var, bessel: float, eps: float):  # type: ignore[override]
        out = native_meanstd(mean, var, bessel, eps)  # one C call (``_native_bc.c``)
        pooled, s = out if out is not None else (None, torch.rsqrt(var * bessel + eps))
        ctx.save_for_backward(mean, s)
        ctx.bessel = bessel
        return mean * s if pooled is None else pooled

    @staticmethod
    @first_order
    def backward(ctx, g):  # type: ignore[override]
        mean, s = ctx.saved_tensors
        grads = native_meanstd_grad(g, mean, s, ctx.bessel)
        if grads is not None:
            return *grads, None, None
        g_var = g * mean * s.pow(3) * (-0.5 * ctx.bessel)
        return g * s, g_var, None, None


class MeanStdPool(_Pool):
    """Paper statistic ``mean / sqrt(var_unbiased + eps)`` with ``eps = 1e-3``."""

    def __init__(self, channels_last: bool = False, eps: float = 1e-3) -> None:
        super().__init__(channels_last)
        self.eps = eps

    def from_moments(self, mean: torch.Tensor, var: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        n = self._n(x3)  # a 0-dim tensor under torch.jit.trace: no Python branch on it
        plain = torch.jit.is_tracing() or torch.compiler.is_compiling() or _fused._device_ops(mean)
        if torch.is_tensor(n) or plain:  # graph capture, or a GPU: autograd's own nodes
            return mean * torch.rsqrt(var * bessel(n) + self.eps)  # n = 1: biased var is 0
        return _MeanStd.apply(mean, var, bessel(n), self.eps)


class AvgPool(_Pool):
    """Plain average over positions."""

    def from_moments(self, mean: torch.Tensor, var: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        return mean


class AvgMaxPool(_Pool):
    """``0.5 * (avg + max)`` over positions (averaged, keeps C features)."""

    def from_moments(self, mean: torch.Tensor, var: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        peak = x3.amax(1 if self.channels_last else 2).to(mean.dtype)
        return 0.5 * (mean + peak)


POOLS: dict[str, type[_Pool]] = {
    "meanstd": MeanStdPool,
    "avg": AvgPool,
    "avgmax": AvgMaxPool,
}


def create_pool(name: str, channels_last: bool = False) -> _Pool:
    """Build a pooled-statistic module by registry name.

    Args:
        name: one of :data:`POOLS`.
        channels_last: True for (B, *, C) inputs, False for (B, C, *).

    Raises:
        UnknownNameError: ``name`` is not in :data:`POOLS`.
    """
    if name not in POOLS:
        raise UnknownNameError(f"unknown pool {name!r}; use one of: {', '.join(POOLS)}")
    return POOLS[name](channels_last=channels_last)
