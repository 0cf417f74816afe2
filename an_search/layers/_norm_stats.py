"""Normalisation statistics of the fused AttentiveNorm path, from per-(sample, channel) moments.

Given each sample's per-channel mean ``m`` and biased variance ``v`` (B, C), the statistics of a
larger group follow from the law of total variance, without another pass over the feature map
and without the cancellation of ``E[x^2] - E[x]^2``:

    var(group) = mean(v over the group) + var(m over the group)        (all biased)

BatchNorm groups over the batch (one value per channel), GroupNorm over the channels of a group
(one value per sample and group).

:func:`batch_scale_shift` goes on to the per-sample scale and shift of a BatchNorm-based AN
site in ONE autograd node with an analytic backward: a dozen (B, C)-sized ops recorded one by
one cost more than the feature-map passes themselves at 7x7 (bench/an_layer.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ._autograd import first_order
from ._native import native_available
from ._native_bc import native_tail, native_tail_grad

__all__ = [
    "batch_scale_shift",
    "batch_stats",
    "group_stats",
    "mark_updated",
    "scale_shift",
    "site_tail",
    "update_running_stats",
]


def group_stats(m: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm mean and biased variance, broadcast back to (B, C)."""
    b, c = m.shape
    shape = (b, groups, c // groups)
    mg = m.view(shape)
    mean = mg.mean(2, keepdim=True)  # (B, G, 1)
    var = v.view(shape).mean(2, keepdim=True) + (mg - mean).square().mean(2, keepdim=True)
    return mean.expand(shape).reshape(b, c), var.expand(shape).reshape(b, c)


def _uses_running_stats(bn: nn.Module, training: bool) -> bool:
    """Frozen BatchNorms always normalise with running statistics; others when evaluating."""
    frozen = not isinstance(bn, nn.modules.batchnorm._BatchNorm)
    return frozen or (not training and bn.running_mean is not None)


def scale_shift(
    gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale = gamma / sqrt(var + eps)`` and ``shift = beta - scale * mean``."""
    scale = gamma * torch.rsqrt(var + eps)
    return scale, torch.addcmul(beta, scale, mean, value=-1.0)


def batch_stats(
    bn: nn.Module, m: torch.Tensor, v: torch.Tensor, n: int, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm mean and biased variance (C,) used to normalise; updates running statistics.

    Args:
        bn: the affine-free inner BatchNorm (or torchvision FrozenBatchNorm2d: running only).
        m: (B, C) per-sample means over n positions.
        v: (B, C) per-sample biased variances.
        n: positions per sample and channel.
        training: the AttentiveNorm's mode.
    """
    if _uses_running_stats(bn, training):
        return bn.running_mean, bn.running_var
    mean = m.mean(0)  # (C,); explicit ops: var_mean over dim 0 is 5x slower on CPU
    var = v.mean(0) + (m - mean).square().mean(0)
    if training and bn.track_running_stats:
        update_running_stats(bn, mean, var, m.shape[0] * n)
    return mean, var


def _bss_grads(
    g_scale: torch.Tensor | None,
    g_shift: torch.Tensor | None,
    m: torch.Tensor,
    mean: torch.Tensor,
    gamma: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(g_m, g_v, g_gamma, g_beta)`` of ``scale = gamma * r``, ``shift = beta -
    scale * mean`` with ``r = rsqrt(var + eps)`` and batch ``mean``/``var`` from ``m``, ``v``."""
    dm, b = m - mean, m.shape[0]
    g_scale = torch.zeros_like(scale) if g_scale is None else g_scale
    g_shift = torch.zeros_like(scale) if g_shift is None else g_shift
    g_s = torch.addcmul(g_scale, g_shift, mean, value=-1.0)  # total d/d scale
    g_r = (g_s * gamma).sum(0)  # (C,)
    g_var = g_r * r.pow(3) * (-0.5)  # d rsqrt(var + eps) = -r^3 / 2
    g_mean = (g_shift * scale).sum(0).neg_()  # shift's direct dependence on the mean
    g_m = torch.addcmul((g_mean / b).expand_as(dm), dm, g_var * (2.0 / b))
    g_v = (g_var / b).expand_as(dm).contiguous()
    return g_m, g_v, g_s * r, g_shift


def _bss(
    m: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, ...]:
    """``(scale, shift, mean, var, r)`` from per-sample moments (ATen ops)."""
    mean = m.mean(0)  # (C,)
    var = v.mean(0) + (m - mean).square().mean(0)
    r = torch.rsqrt(var + eps)
    scale = gamma * r
    shift = torch.addcmul(beta, scale, mean, value=-1.0)  # as scale_shift, keeping r
    return scale, shift, mean, var, r


class _BatchScaleShift(torch.autograd.Function):
    """(m, v, gamma, beta) -> (scale, shift, mean, var) with batch statistics from moments."""

    @staticmethod
    def forward(ctx, m, v, gamma, beta, eps: float):  # type: ignore[override]
        scale, shift, mean, var, r = _bss(m, v, gamma, beta, eps)
        ctx.save_for_backward(m, gamma, r, mean, scale)
        ctx.mark_non_differentiable(mean, var)
        return scale, shift, mean, var

    @staticmethod
    @first_order
    def backward(ctx, g_scale, g_shift, _g_mean, _g_var):  # type: ignore[override]
        m, gamma, r, mean, scale = ctx.saved_tensors
        return *_bss_grads(g_scale, g_shift, m, mean, gamma, r, scale), None


class _SiteTail(torch.autograd.Function):
    """(lam, Wm, Bm, m, v) -> (scale, shift, mean, var): the mixtures ``gamma = lam @ Wm``,
    ``beta = lam @ Bm`` and :class:`_BatchScaleShift` in one node, forward and backward each
    one C call (``_native_bc.c``) where the kernels apply."""

    @staticmethod
    def forward(ctx, lam, wm, bm, m, v, eps: float):  # type: ignore[override]
        out = native_tail(lam, wm, bm, m, v, eps)
        if out is not None:
            gamma, scale, shift, mean, var, r = out
        else:
            gamma = lam @ wm
            scale, shift, mean, var, r = _bss(m, v, gamma, lam @ bm, eps)
        ctx.save_for_backward(lam, wm, bm, m, mean, gamma, r, scale)
        ctx.mark_non_differentiable(mean, var)
        return scale, shift, mean, var

    @staticmethod
    @first_order
    def backward(ctx, g_scale, g_shift, _g_mean, _g_var):  # type: ignore[override]
        saved = ctx.saved_tensors
        grads = native_tail_grad(g_scale, g_shift, saved)
        if grads is not None:
            g_lam, g_wm, g_bm, g_m, g_v = grads
        else:  # e.g. a dispatch mode (FlopCounterMode) around the backward
            lam, wm, bm, m, mean, gamma, r, scale = saved
            g_m, g_v, g_gamma, g_beta = _bss_grads(g_scale, g_shift, m, mean, gamma, r, scale)
            g_lam = g_gamma @ wm.T + g_beta @ bm.T
            g_wm, g_bm = lam.T @ g_gamma, lam.T @ g_beta
        return g_lam, g_wm, g_bm, g_m, g_v, None


def site_tail(
    bn: nn.Module,
    m: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    wm: torch.Tensor,
    bm: torch.Tensor,
    n: int,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample scale and shift (B, C) of a BatchNorm-based site from the head's ``lam``
    (B, K), the mixtures ``wm``, ``bm`` (K, C) and the moments, as :func:`batch_scale_shift`
    of ``lam @ wm``, ``lam @ bm``; updates the running statistics. None where it does not
    apply (running statistics used, graph capture, no C kernels, other dtypes or devices)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or _uses_running_stats(bn, training):
        return None
    if not (lam.dtype == wm.dtype == bm.dtype == m.dtype) or not native_available():
        return None  # (layout: the kernels check it; _SiteTail falls back to ATen ops)
    if not m.is_cpu:
        return None
    scale, shift, mean, var = _SiteTail.apply(lam, wm, bm, m, v, bn.eps)
    if training and bn.track_running_stats:
        update_running_stats(bn, mean, var, m.shape[0] * n)
    return scale, shift


def batch_scale_shift(
    bn: nn.Module,
    m: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    n: int,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - scale * mean`` (B, C).

    ``mean``/``var`` are the batch statistics from the moments (training, or no running
    statistics) or the running ones; updates the running statistics as :func:`batch_stats`.
    Under ``torch.jit.trace`` and ``torch.compile``: plain differentiable ops.
    """
    plain = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if plain or _uses_running_stats(bn, training):
        return scale_shift(gamma, beta, *batch_stats(bn, m, v, n, training), bn.eps)
    scale, shift, mean, var = _BatchScaleShift.apply(m, v, gamma, beta, bn.eps)
    if training and bn.track_running_stats:
        update_running_stats(bn, mean, var, m.shape[0] * n)
    return scale, shift


@torch.no_grad()
def update_running_stats(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """As ``nn.BatchNorm``: momentum (None = cumulative average), unbiased variance, counter."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    bn.running_var.lerp_(var.to(bn.running_var.dtype) * (count / (count - 1)), factor)


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def mark_updated(*norms: nn.Module) -> None:
    """Record a kernel's write (C or Triton, through a data pointer) into the running statistics
    and counter of each BatchNorm as the in-place update it is: their version counters move,
    as ``nn.BatchNorm``'s own update moves them, so the folded eval plans keyed on them
    (``_eval_plan._Key``) fold again instead of keeping the statistics they were folded from."""
    for bn in norms:
        buffers = bn._buffers
        for name in _RUNNING:
            t = buffers.get(name)
            if t is not None:
                torch.autograd.graph.increment_version(t)
