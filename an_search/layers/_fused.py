"""Fast kernels for Attentive Normalization: the C kernels of ``_native.c`` where they can be
built, otherwise stock ATen ops (no compiler needed), with the same numerics.

Two differentiable primitives carry the whole fast path (DESIGN.md point 13):

- :func:`moments`: per-(sample, channel) mean and variance over the positions, from two
  streaming reductions (``sum`` and ``linalg.vector_norm``): on CPU 15-25x faster than
  ``var_mean``/``std`` over (H, W).
- :func:`channel_affine`: ``y[b, c] = x[b, c] * a[b, c] + t[b, c]`` in ONE pass, without ever
  materialising K copies of the feature map. For a contiguous tensor it runs BatchNorm's
  inference kernel on the ``(1, B*C, n)`` view (weight ``a``, bias ``t``, statistics that make
  it the identity), the fastest per-channel affine kernel in ATen; its backward gets
  ``sum(g * x)`` and ``sum(g)`` from one fused reduction (``native_batch_norm_backward``).

Both read the same input, so its gradient has the form ``g * a + c * x + d``. Computed
separately, autograd would allocate three feature-map-sized buffers (two terms and their sum).
A :class:`GradLink` shared by the two calls of one layer lets the affine's backward hand
``(g, a)`` to the moments' backward (which autograd always runs later: ``a`` depends on the
moments), which then writes the whole gradient into one buffer.

Off the CPU (CUDA): ``var_mean`` and one broadcast ``addcmul``, with autograd's own backward:
there the GPU work is small and each custom Function's Python backward costs more than it saves.

Numerics: the one-pass variance ``E[x^2] - E[x]^2`` (float32 accumulation, also for
half/bfloat16 inputs) is recomputed two-pass for the rows where it cancels (mean^2 > 4 var, or
rounding made it negative), and only those rows (the ReLU of a centred Gaussian has
mean^2 ~ 0.47 var): it is never negative and keeps a relative error below ~2e-6.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._autograd import first_order
from ._native import (
    as_layout_of,
    channels_last_map,
    native_affine,
    native_affine_grad,
    native_moments,
    native_moments_cl,
    native_row_dots,
)

__all__ = ["GradLink", "bessel", "channel_affine", "grad_link", "moments", "spatial_view"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Rows with mean^2 > this * var get a two-pass variance: the one-pass relative error is about
# 4e-7 * mean^2 / var in float32 (measured), so it stays below ~2e-6.
_MAX_MEAN2_OVER_VAR = 4.0
_CANCEL = 1.0 / (1.0 + _MAX_MEAN2_OVER_VAR)  # the same test as var < E[x^2] * _CANCEL
_MIN_POSITIONS_FOR_BN_KERNEL = 128


def bessel(n: Any) -> Any:
    """``n / (n - 1)``, the unbiased variance's factor over the biased one; 1 for a single
    value (its biased variance, 0, as the ``meanstd`` pool has it). The size ``n`` may be a
    tensor (``torch.jit.trace``) or a SymInt (``torch.export``, ``torch.compile``): the factor
    stays an expression of it, not the traced example's branch."""
    if torch.is_tensor(n):
        return n / (n - 1).clamp(min=1)
    if isinstance(n, int):  # (Dynamo before torch 2.14 breaks its graph on sym_max of ints)
        return n / max(n - 1, 1)
    return n / torch.sym_max(n - 1, 1)


def _device_ops(x: torch.Tensor) -> bool:
    """Tensors off the CPU (CUDA, ...) take one-kernel ATen ops without host syncs."""
    return x.device.type != "cpu"


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def spatial_view(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """View ``x`` as (B, C, n) (channels_first) or (B, n, C) (channels_last), n >= 1."""
    shape = x.shape  # (n spelled out, not -1: an empty batch has no size to infer it from)
    if channels_last:
        return x.reshape(shape[0], math.prod(shape[1:-1]), shape[-1])
    return x.reshape(shape[0], shape[1], math.prod(shape[2:]))


class GradLink:
    """Carries ``(g, a)`` from :func:`channel_affine`'s backward to :func:`moments`' backward."""

    __slots__ = ("grad", "scale")

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None


def grad_link(x: torch.Tensor) -> GradLink | None:
    """A :class:`GradLink` for one layer's :func:`moments` and :func:`channel_affine` calls on
    ``x``, or None where the moments' backward is autograd's own (off the CPU, no gradient)."""
    if x.requires_grad and torch.is_grad_enabled() and not _device_ops(x):
        return GradLink()
    return None


def _affine_kernel(
    x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, owned: bool = False
) -> torch.Tensor:
    """``x * a + t`` per (sample, channel) for a contiguous (B, C, *) tensor, no autograd.

    From n = 128 positions up: BatchNorm inference on the (1, B*C, n) view with mean 0, variance
    0 and eps 1, so that ``1 / sqrt(var + eps)`` is exactly 1 (one zero buffer serves as both
    statistics). Below, its per-channel loop costs more than a broadcast multiply + add.
    ``owned=True`` returns a tensor that is not a view (written through ``out=``): the output
    of a custom autograd Function must not be one, or ``y += shortcut`` downstream fails.
    """
    if a.dtype == t.dtype == x.dtype:
        y = native_affine(x, a, t)  # always a fresh tensor ("owned")
        if y is not None:
            return y
    b, c = a.shape
    if not x.is_contiguous():  # channels-last without the C kernels: one broadcast op
        shape = (b, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(t.view(shape), x, a.view(shape)).to(x.dtype)
    n = x.numel() // max(b * c, 1)
    acc = _acc_dtype(x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if owned else None
    if n < _MIN_POSITIONS_FOR_BN_KERNEL and a.dtype == t.dtype == x.dtype:
        a3, t3 = a.unsqueeze(2), t.unsqueeze(2)
        if out is None:
            return (x.view(b, c, n) * a3).add_(t3).view(x.shape)
        torch.mul(x.view(b, c, n), a3, out=out.view(b, c, n)).add_(t3)
        return out
    zero = x.new_zeros(b * c, dtype=acc)
    a, t = a.reshape(b * c).to(acc), t.reshape(b * c).to(acc)
    if out is None:
        y = F.batch_norm(x.view(1, b * c, n), zero, zero, a, t, False, 0.0, 1.0)
        return y.view(x.shape)
    empty = zero.new_empty(0)
    torch.ops.aten.native_batch_norm.out(
        x.view(1, b * c, n), a, t, zero, zero, False, 0.0, 1.0,
        out=out.view(1, b * c, n), save_mean=empty, save_invstd=empty.clone(),
    )  # fmt: skip
    return out


def _stats(x3: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and biased variance, one pass; two-pass where it cancels (no autograd)."""
    acc = _acc_dtype(x3)
    if x3.shape[dim] == 1:  # one position: the variance is exactly 0
        mean = x3.squeeze(dim).to(acc, copy=True)
        return mean, torch.zeros_like(mean)
    # one read, in C (``_native.c``, ``_native_cl.c``), where it can be built; a channels-last
    # map's (B, C, n) view is its (B, n, C) memory transposed
    out = native_moments(x3) if dim == 2 and x3.is_contiguous() else None
    if out is None and x3.dim() == 3:
        cols = x3 if dim == 1 else x3.transpose(1, 2)
        out = native_moments_cl(cols) if cols.is_contiguous() else None
    if out is not None:
        return out
    mean = x3.mean(dim, dtype=acc)
    sq = torch.linalg.vector_norm(x3, 2, dim, dtype=acc).square_().mul_(1.0 / x3.shape[dim])
    var = torch.addcmul(sq, mean, mean, value=-1.0)  # E[x^2] - E[x]^2
    bad = var < sq * _CANCEL  # mean^2 > _MAX_MEAN2_OVER_VAR * var, or var < 0 from rounding
    if bool(bad.any()):  # one host sync (CPU only): cheap
        _centered_var(x3, dim, mean, var, bad)
    return mean, var


def _centered_var(
    x3: torch.Tensor, dim: int, mean: torch.Tensor, var: torch.Tensor, bad: torch.Tensor
) -> None:
    """Recompute ``var`` in place, two-pass, for the ``bad`` rows only."""
    idx = bad.nonzero(as_tuple=True)
    rows = (x3.transpose(1, 2) if dim == 1 else x3)[idx]  # (rows, n) copy of the bad rows only
    centered = rows.to(mean.dtype) - mean[idx].unsqueeze(1)
    var[idx] = torch.linalg.vector_norm(centered, 2, 1).square_() / rows.shape[1]


class _Moments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3: torch.Tensor, dim: int, link: GradLink | None):  # type: ignore[override]
        mean, var = _stats(x3, dim)
        ctx.save_for_backward(x3, mean)
        ctx.dim, ctx.link = dim, link
        return mean, var

    @staticmethod
    @first_order
    def backward(ctx, g_mean: torch.Tensor | None, g_var: torch.Tensor | None):  # type: ignore[override]
        # d mean / dx = 1/n, d var / dx = 2 (x - mean) / n  ->  dx = c * x + d
        x3, mean = ctx.saved_tensors
        dim, link = ctx.dim, ctx.link
        inv_n = 1.0 / x3.shape[dim]
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        # (n = 1: x = mean, the variance's share is 0; c * x - c * mean would cancel)
        no_var = g_var is None or x3.shape[dim] == 1
        c = torch.zeros_like(mean) if no_var else g_var * (2.0 * inv_n)
        d = torch.addcmul(g_mean * inv_n, c, mean, value=-1.0)
        if dim == 1:  # channels_last (B, n, C): broadcast over n
            return torch.addcmul(d.unsqueeze(1), x3, c.unsqueeze(1)).to(x3.dtype), None, None
        if not x3.is_contiguous() and not channels_last_map(x3):
            return torch.addcmul(d.unsqueeze(2), x3, c.unsqueeze(2)).to(x3.dtype), None, None
        if link is not None and link.grad is not None:  # (x3 contiguous or channels-last)
            g, a = as_layout_of(link.grad.view(x3.shape), x3), link.scale
            link.grad = link.scale = None
            gx = native_affine_grad(g, x3, a, c, d)  # g * a + c * x + d in one pass
            if gx is not None:
                return gx, None, None
            gx = _affine_kernel(g, a, d)  # g * a + d
            return gx.addcmul_(x3, c.unsqueeze(2).to(gx.dtype)), None, None  # + c * x
        return _affine_kernel(x3, c, d), None, None


class _ChannelAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, t, link):  # type: ignore[override]
        ctx.save_for_backward(x, a)
        ctx.link = link
        return _affine_kernel(x, a, t, owned=True)

    @staticmethod
    @first_order
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        x, a = ctx.saved_tensors
        need_x, need_a, need_t = ctx.needs_input_grad[:3]
        b, c = a.shape
        gx = ga = gt = None
        gy = as_layout_of(gy, x)
        dots = native_row_dots(gy, x, b * c) if need_a or need_t else None
        if dots is not None:  # sum(g * x) and sum(g) per row, one pass
            ga = dots[0].view(b, c).to(a.dtype) if need_a else None
            gt = dots[1].view(b, c).to(a.dtype) if need_t else None
        elif (need_a or need_t) and not x.is_contiguous():  # channels-last, no C kernels
            dims = tuple(range(2, x.dim()))
            ga = (gy * x).sum(dims, dtype=_acc_dtype(x)).to(a.dtype) if need_a else None
            gt = gy.sum(dims, dtype=_acc_dtype(x)).to(a.dtype) if need_t else None
        elif need_a or need_t:
            acc = _acc_dtype(x)
            zero = x.new_zeros(b * c, dtype=acc)
            _, ga, gt = torch.ops.aten.native_batch_norm_backward(
                gy.view(1, b * c, -1),
                x.view(1, b * c, -1),
                a.reshape(b * c).to(acc),
                zero,
                zero,
                None,
                None,
                False,
                1.0,
                [False, need_a, need_t],
            )
            ga = None if ga is None else ga.view(b, c).to(a.dtype)
            gt = None if gt is None else gt.view(b, c).to(a.dtype)
        if need_x:
            if ctx.link is not None:  # moments' backward writes the full input gradient
                ctx.link.grad, ctx.link.scale = gy, a
            else:
                gx = _affine_kernel(gy, a, torch.zeros_like(a))
        return gx, ga, gt, None


def moments(
    x3: torch.Tensor, channels_last: bool = False, link: GradLink | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and biased variance of a (B, C, n) or (B, n, C) tensor.

    On CPU: one ``mean`` and one ``vector_norm`` pass (variance ``E[x^2] - E[x]^2``); rows
    whose mean^2 exceeds 4x their variance are redone two-pass, so the variance is never
    negative and keeps a relative error below ~2e-6 whatever the offset. Elsewhere, and under
    ``torch.jit.trace`` (fvcore, ONNX) or ``torch.compile``: ``torch.var_mean``, one plain op
    without host sync.

    Args:
        x3: (B, C, n) for ``channels_last=False``, (B, n, C) otherwise (see :func:`spatial_view`).
        channels_last: where the channel axis is.
        link: shared with the :func:`channel_affine` call on the same ``x3`` (CPU only, see the
            module doc).

    Returns:
        ``(mean, var)``, each (B, C), float32 for half/bfloat16 inputs. Differentiable.
    """
    dim = 1 if channels_last else 2
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        var, mean = torch.var_mean(x3.to(_acc_dtype(x3)), dim, correction=0)
        return mean, var
    if _device_ops(x3):
        return _device_moments(x3, dim)
    if not (x3.requires_grad and torch.is_grad_enabled()):
        return _stats(x3, dim)
    return _Moments.apply(x3, dim, link)


def _device_moments(x3: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Off the CPU: ``var_mean`` (one Welford pass); for half/bfloat16 inputs ``mean`` and
    ``vector_norm`` accumulating in float32 (no float32 copy of the map), clamped at 0: their
    ``E[x^2] - E[x]^2`` loses ~1e-7 * mean^2 / var relative, far below the inputs' rounding."""
    if x3.dtype not in _LOW_PRECISION:
        var, mean = torch.var_mean(x3, dim, correction=0)
        return mean, var
    mean = x3.mean(dim, dtype=torch.float32)
    sq = torch.linalg.vector_norm(x3, 2, dim, dtype=torch.float32).square() / x3.shape[dim]
    return mean, torch.addcmul(sq, mean, mean, value=-1.0).clamp_min(0.0)


def channel_affine(
    x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, link: GradLink | None = None
) -> torch.Tensor:
    """One-pass per-(sample, channel) affine ``y[b, c, ...] = x[b, c, ...] * a[b, c] + t[b, c]``.

    Args:
        x: (B, C, *) feature map.
        a: (B, C) scale.
        t: (B, C) shift.
        link: shared with the :func:`moments` call on the same input; only valid when that
            call's outputs feed ``a`` or ``t`` (so its backward runs after this one's).

    Returns:
        Tensor of ``x``'s shape and dtype; differentiable in all three inputs. Under
        ``torch.jit.trace`` or ``torch.compile`` a plain broadcast ``addcmul`` (traceable, no
        custom Function).
    """
    shape = a.shape + (1,) * (x.dim() - 2)  # any memory format (TensorIterator keeps it)
    if _device_ops(x):  # one broadcast kernel; autograd's own backward (no Python on the GPU)
        return torch.addcmul(t.view(shape).to(x.dtype), x, a.view(shape).to(x.dtype))
    plain = torch.jit.is_tracing() or torch.compiler.is_compiling()  # graph capture: ATen ops
    if not plain and (x.is_contiguous() or channels_last_map(x)) and x.numel() > 0:
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or t.requires_grad):
            return _ChannelAffine.apply(x, a, t, link)
        return _affine_kernel(x, a, t)
    return torch.addcmul(t.view(shape), x, a.view(shape)).to(x.dtype)
