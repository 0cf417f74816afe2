"""The (B, C)-level kernels of ``_native_bc.c``: one call for each forward or backward of the
training path's tail, mixture + batch statistics (:class:`~._norm_stats._SiteTail`), and
pooled statistic (:class:`~.pooling._MeanStd`), in place of a dozen small ATen ops. Each
returns None where the kernels do not apply (no library, dtype, device, layout, a dispatch
mode); callers then run the ATen ops."""

from __future__ import annotations

import torch

from ._native import kernel_for

__all__ = [
    "native_linbn",
    "native_linbn_grad",
    "native_meanstd",
    "native_meanstd_grad",
    "native_tail",
    "native_tail_grad",
]


def native_tail(
    lam: torch.Tensor,
    wm: torch.Tensor,
    bm: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, ...] | None:
    """``(gamma, scale, shift, mean, var, r)`` of a BatchNorm-based site in training:
    ``gamma = lam @ wm``, batch ``mean``/``var`` (C,) from the per-sample moments ``m``, ``v``
    (B, C), ``r = rsqrt(var + eps)``, ``scale = gamma * r``, ``shift = lam @ bm - scale * mean``.
    """
    fn = kernel_for("an_tail_fwd", (m, v), (wm, bm), (lam,))
    if fn is None or m.dim() != 2 or lam.dim() != 2:
        return None
    (b, c), k = m.shape, lam.shape[1]
    if lam.shape[0] != b or wm.shape != (k, c):
        return None
    gamma, scale, shift = torch.empty_like(m), torch.empty_like(m), torch.empty_like(m)
    mean, var, r = m.new_empty(c), m.new_empty(c), m.new_empty(c)
    ins = (t.data_ptr() for t in (lam, wm, bm, m, v))
    outs = (t.data_ptr() for t in (gamma, scale, shift, mean, var, r))
    if fn(*ins, b, c, k, eps, *outs):
        raise MemoryError("AttentiveNorm batch statistics: out of memory")
    return gamma, scale, shift, mean, var, r


def native_tail_grad(
    g_scale: torch.Tensor | None,
    g_shift: torch.Tensor | None,
    saved: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...] | None:
    """``(g_lam, g_wm, g_bm, g_m, g_v)`` of :func:`native_tail` from the gradients of
    ``scale`` and ``shift`` (None: zero); ``saved`` is ``(lam, wm, bm, m, mean, gamma, r,
    scale)``."""
    lam, wm, bm, m, mean, gamma, r, scale = saved
    g_scale, g_shift = (None if g is None else g.contiguous() for g in (g_scale, g_shift))
    grads = tuple(g for g in (g_scale, g_shift) if g is not None)
    fn = kernel_for("an_tail_bwd", (m, gamma, scale, *grads), (mean, r), (lam,), (wm, bm))
    if fn is None:
        return None  # (shapes as native_tail made them)
    (b, c), k = m.shape, lam.shape[1]
    g_lam, g_wm, g_bm = torch.empty_like(lam), torch.empty_like(wm), torch.empty_like(bm)
    g_m, g_v = torch.empty_like(m), torch.empty_like(m)
    gs, gt = (None if g is None else g.data_ptr() for g in (g_scale, g_shift))
    ins = (t.data_ptr() for t in saved)
    outs = (t.data_ptr() for t in (g_lam, g_wm, g_bm, g_m, g_v))
    if fn(gs, gt, *ins, b, c, k, *outs):
        raise MemoryError("AttentiveNorm batch statistics: out of memory")
    return g_lam, g_wm, g_bm, g_m, g_v


def native_meanstd(
    mean: torch.Tensor, var: torch.Tensor, bessel: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean * s, s)`` with ``s = rsqrt(var * bessel + eps)``, elementwise over (B, C)."""
    fn = kernel_for("an_meanstd_fwd", (mean, var))
    if fn is None:
        return None
    out, s = torch.empty_like(mean), torch.empty_like(mean)
    fn(mean.data_ptr(), var.data_ptr(), mean.numel(), bessel, eps, out.data_ptr(), s.data_ptr())
    return out, s


def native_meanstd_grad(
    g: torch.Tensor, mean: torch.Tensor, s: torch.Tensor, bessel: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(g * s, -bessel / 2 * g * mean * s^3)``: the gradients of :func:`native_meanstd`."""
    g = g.contiguous()
    fn = kernel_for("an_meanstd_bwd", (g, mean, s))
    if fn is None:
        return None
    g_mean, g_var = torch.empty_like(g), torch.empty_like(g)
    fn(g.data_ptr(), mean.data_ptr(), s.data_ptr(), g.numel(), bessel, g_mean.data_ptr(),
       g_var.data_ptr())  # fmt: skip
    return g_mean, g_var


def native_linbn(
    x: torch.Tensor, w: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor, eps: float
) -> tuple[torch.Tensor, ...] | None:
    """``(z, hhat, mean, var, r)``: ``h = x @ w.T`` (B, K) normalised over the batch,
    ``hhat = (h - mean) * r`` with ``r = rsqrt(var + eps)`` (biased ``var``), ``z = hhat * gw
    + gb``: a bias-free Linear followed by a training-mode BatchNorm1d (x (B, C), w (K, C))."""
    fn = kernel_for("an_linbn_fwd", (x,), (w,), (gw, gb))
    if fn is None or x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1]:
        return None
    (b, c), k = x.shape, w.shape[0]
    if gw.shape != (k,):
        return None
    z, hhat = x.new_empty(b, k), x.new_empty(b, k)
    mean, var, r = x.new_empty(k), x.new_empty(k), x.new_empty(k)
    outs = (t.data_ptr() for t in (z, hhat, mean, var, r))
    fn(x.data_ptr(), w.data_ptr(), gw.data_ptr(), gb.data_ptr(), b, c, k, eps, *outs)
    return z, hhat, mean, var, r


def native_linbn_grad(
    gz: torch.Tensor, saved: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...] | None:
    """``(g_x, g_w, g_gw, g_gb)`` of :func:`native_linbn`; ``saved`` is ``(x, w, gw, hhat,
    r)``."""
    x, w, gw, hhat, r = saved
    gz = gz.contiguous()
    fn = kernel_for("an_linbn_bwd", (gz, hhat), (x,), (w,), (gw, r))
    if fn is None:
        return None
    (b, c), k = x.shape, w.shape[0]
    g_x, g_w, g_gw, g_gb = torch.empty_like(x), torch.empty_like(w), x.new_empty(k), x.new_empty(k)
    ins = (t.data_ptr() for t in (gz, x, w, gw, hhat, r))
    outs = (t.data_ptr() for t in (g_x, g_w, g_gw, g_gb))
    if fn(*ins, b, c, k, *outs):
        raise MemoryError("AttentiveNorm head: out of memory")
    return g_x, g_w, g_gw, g_gb
