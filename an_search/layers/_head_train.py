"""Training-mode fast path of the heads' bias-free ``Linear`` followed by ``BatchNorm1d``.

On the CPU the pair costs more than its arithmetic: the (B, C) x (C, K) product starts MKL's
threads and ATen's BatchNorm1d runs an OpenMP region per call for K channels, each ~20-100 us
at B = 32, C = 512, K = 10, forward and backward. :func:`linear_batchnorm` does the pair as one
autograd node whose forward and backward are each one C call (``_native_bc.c``), with
BatchNorm1d's training semantics: batch mean and biased variance normalise, the running
statistics take the unbiased variance (momentum, cumulative average, counter).
"""

from __future__ import annotations

import torch
from torch import nn

from ._autograd import first_order
from ._native import native_available
from ._native_bc import native_linbn, native_linbn_grad
from ._norm_stats import update_running_stats

__all__ = ["linear_batchnorm"]


class _LinearBatchNorm(torch.autograd.Function):
    """(x, W, gw, gb) -> (z, mean, var): ``z = BN(x @ W.T)`` with batch statistics."""

    @staticmethod
    def forward(ctx, x, w, gw, gb, eps: float):  # type: ignore[override]
        out = native_linbn(x, w, gw, gb, eps)
        if out is not None:
            z, hhat, mean, var, r = out
        else:  # e.g. a dispatch mode, a non-contiguous input: the same maths in ATen ops
            h = x @ w.T
            mean = h.mean(0)
            var = (h - mean).square().mean(0)
            r = torch.rsqrt(var + eps)
            hhat = (h - mean) * r
            z = hhat * gw + gb
        ctx.save_for_backward(x, w, gw, hhat, r)
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    @first_order
    def backward(ctx, gz, _g_mean, _g_var):  # type: ignore[override]
        saved = ctx.saved_tensors
        grads = native_linbn_grad(gz, saved)
        if grads is None:  # e.g. a dispatch mode (FlopCounterMode) around the backward
            x, w, gw, hhat, r = saved
            b = x.shape[0]
            sg, sgh = gz.sum(0), (gz * hhat).sum(0)
            g_h = (gw * r / b) * (b * gz - sg - hhat * sgh)
            grads = (g_h @ w, g_h.T @ x, sgh, sg)
        return *grads, None


def linear_batchnorm(fc: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``bn(fc(x))`` for a bias-free ``nn.Linear`` and an affine ``nn.BatchNorm1d`` in training
    mode, as one node (updates ``bn``'s running statistics); None where it does not apply
    (other modules or modes, graph capture, autocast, off the CPU, no C kernels, dtypes,
    batch of 1)."""
    if type(fc) is not nn.Linear or type(bn) is not nn.BatchNorm1d or fc.bias is not None:
        return None
    if not bn.training or not bn.affine or x.dim() != 2 or x.shape[0] < 2:
        return None  # (a batch of 1: BatchNorm1d raises its own error)
    if fc._forward_pre_hooks or bn._forward_pre_hooks:
        return None  # (torch.nn.utils.prune's: the weights are made by calling the module)
    if not x.is_cpu:  # the C kernels are CPU's; elsewhere stock BatchNorm1d is one kernel
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return None
    dtypes = {x.dtype, fc.weight.dtype, bn.weight.dtype, bn.bias.dtype}
    if dtypes not in ({torch.float32}, {torch.float64}) or not native_available():
        return None
    z, mean, var = _LinearBatchNorm.apply(x, fc.weight, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        update_running_stats(bn, mean, var, x.shape[0])
    return z
