"""A BatchNorm-based AN site in training on the CPU as ONE autograd node.

The fused path (``_fused.py``, ``_norm_stats.py``, ``_head_train.py``) runs a training site as
five custom autograd nodes (moments, pooled statistic, head, tail, affine) plus the gate and
the running-statistic updates: about twenty Python-level steps forward and as many backward,
each 5-30 us on a 2-core VM whatever the tensor size, ~1.6 ms a training step at 2x2 where
BatchNorm2d takes 0.3 ms. Here the whole site is one node whose forward is six C calls
(moments; meanstd; the head's Linear + BatchNorm1d; the tail; the affine; the running
statistics, ``_native.c`` / ``_native_bc.c``) and one gate op, and whose backward is five C
calls and the gate's backward; every tensor check is done once, up front.

Covered: inner ``nn.BatchNorm1d/2d/3d`` normalising with batch statistics, the ``meanstd`` and
``avg`` pools, the heads ``default``, ``bn-sigmoid`` and ``bn-softmax`` in training mode,
contiguous float32/float64 inputs and parameters of one dtype, batch >= 2, no graph capture,
dispatch mode or autocast. Anything else returns None: the fused path runs as before (same
kernels, same numerics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._native import library
from .pooling import AvgPool, MeanStdPool

__all__ = ["cpu_site"]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_GATES = {nn.Hardsigmoid: "hsigmoid", nn.Sigmoid: "sigmoid", nn.Softmax: "softmax"}


def _gate(kind: str, z: torch.Tensor) -> torch.Tensor:
    if kind == "hsigmoid":
        return F.hardsigmoid(z)
    return torch.sigmoid(z) if kind == "sigmoid" else torch.softmax(z, 1)


def _gate_grad(kind: str, g: torch.Tensor, z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    if kind == "hsigmoid":
        return torch.ops.aten.hardsigmoid_backward(g, z)
    if kind == "sigmoid":
        return torch.ops.aten.sigmoid_backward(g, lam)
    return torch.ops.aten._softmax_backward_data(g, lam, 1, lam.dtype)


class _Site(torch.autograd.Function):
    """(x, W, gw, gb, Wm, Bm) -> (y, head mean, head var, mean, var); ``cfg`` holds the
    library's kernels for the dtype, the sizes, the eps and the pool's and gate's kinds."""

    @staticmethod
    def forward(ctx, x, w, gw, gb, wm, bm, cfg):  # type: ignore[override]
        fns, (b, c, n, k), (bessel, pool_eps, head_eps, eps), meanstd, gate = cfg
        threads = torch.get_num_threads()
        bc = b * c
        # one workspace: m, v, pooled, s, gamma, scale, shift | z, hhat | hmean, hvar, hr,
        # mean, var, r
        ws = x.new_empty(7 * bc + 2 * b * k + 3 * k + 3 * c)
        size, base = x.element_size(), ws.data_ptr()
        m, v, pooled, s, gamma, scale, shift = (base + i * bc * size for i in range(7))
        z, hhat = (base + (7 * bc + i * b * k) * size for i in range(2))
        at = 7 * bc + 2 * b * k
        hm, hv, hr = (base + (at + i * k) * size for i in range(3))
        mean, var, r = (base + (at + 3 * k + i * c) * size for i in range(3))
        fns["an_moments"](x.data_ptr(), bc, n, m, v, threads)
        if meanstd:
            fns["an_meanstd_fwd"](m, v, bc, bessel, pool_eps, pooled, s)
        stat = pooled if meanstd else m
        fns["an_linbn_fwd"](stat, w.data_ptr(), gw.data_ptr(), gb.data_ptr(), b, c, k, head_eps,
                            z, hhat, hm, hv, hr)  # fmt: skip
        z_t = ws[7 * bc : 7 * bc + b * k].view(b, k)
        lam = _gate(gate, z_t)
        ins = (lam.data_ptr(), wm.data_ptr(), bm.data_ptr(), m, v)
        if fns["an_tail_fwd"](*ins, b, c, k, eps, gamma, scale, shift, mean, var, r):
            raise MemoryError("AttentiveNorm batch statistics: out of memory")
        y = torch.empty_like(x)
        fns["an_affine"](x.data_ptr(), scale, shift, y.data_ptr(), bc, n, threads)
        ctx.save_for_backward(x, w, gw, wm, bm, ws, lam)
        ctx.cfg = cfg
        stats = ws[at:].split([k, k, k, c, c, c])
        ctx.mark_non_differentiable(*stats)
        return y, stats[0], stats[1], stats[3], stats[4]

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, *_):  # type: ignore[override]
        x, w, gw, wm, bm, ws, lam = ctx.saved_tensors
        fns, (b, c, n, k), (bessel, *_eps), meanstd, gate = ctx.cfg
        threads = torch.get_num_threads()
        bc, size, base = b * c, x.element_size(), ws.data_ptr()
        m, _, pooled, s, gamma, scale = (base + i * bc * size for i in range(6))
        at = 7 * bc + 2 * b * k
        hhat, hr = base + (7 * bc + b * k) * size, base + (at + 2 * k) * size
        mean, r = base + (at + 3 * k) * size, base + (at + 3 * k + 2 * c) * size
        gy = gy.contiguous()
        # backward workspace: sgx, sg, g_m, g_v, g_p, cc, dd | g_lam
        gws = x.new_empty(7 * bc + b * k)
        g0 = gws.data_ptr()
        sgx, sg, g_m, g_v, g_p, cc, dd = (g0 + i * bc * size for i in range(7))
        fns["an_row_dots"](gy.data_ptr(), x.data_ptr(), sgx, sg, bc, n, threads)
        g_wm, g_bm, g_w = torch.empty_like(wm), torch.empty_like(bm), torch.empty_like(w)
        g_gw, g_gb = torch.empty_like(gw), torch.empty_like(gw)
        outs = (g0 + 7 * bc * size, g_wm.data_ptr(), g_bm.data_ptr(), g_m, g_v)
        ins = (lam.data_ptr(), wm.data_ptr(), bm.data_ptr(), m, mean, gamma, r, scale)
        if fns["an_tail_bwd"](sgx, sg, *ins, b, c, k, *outs):
            raise MemoryError("AttentiveNorm batch statistics: out of memory")
        z = ws[7 * bc : 7 * bc + b * k].view(b, k)
        g_z = _gate_grad(gate, gws[7 * bc :].view(b, k), z, lam).contiguous()
        stat = pooled if meanstd else m
        ins = (g_z.data_ptr(), stat, w.data_ptr(), gw.data_ptr(), hhat, hr)
        if fns["an_linbn_bwd"](*ins, b, c, k, g_p, g_w.data_ptr(), g_gw.data_ptr(),
                               g_gb.data_ptr()):  # fmt: skip
            raise MemoryError("AttentiveNorm head: out of memory")
        gx = None
        if ctx.needs_input_grad[0]:
            fns["an_site_coefs"](g_m, g_v, g_p, m, s, bc, n, bessel, meanstd, cc, dd)
            gx = torch.empty_like(x)
            fns["an_affine_grad"](gy.data_ptr(), x.data_ptr(), scale, cc, dd, gx.data_ptr(), bc,
                                  n, threads)  # fmt: skip
        return gx, g_w, g_gw, g_gb, g_wm, g_bm, None


def _running(fns: dict, bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """``bn``'s running statistics and counter after a batch (``an_running``)."""
    counter = bn.num_batches_tracked
    momentum = -1.0 if bn.momentum is None else float(bn.momentum)
    fns["an_running"](bn.running_mean.data_ptr(), bn.running_var.data_ptr(),
                      None if counter is None else counter.data_ptr(), mean.data_ptr(),
                      var.data_ptr(), mean.numel(), momentum, float(count))  # fmt: skip


def _kernels(dtype: torch.dtype) -> dict | None:
    lib, suffix = library(), _SUFFIX.get(dtype)
    if lib is None or suffix is None:
        return None
    names = ("an_moments", "an_meanstd_fwd", "an_linbn_fwd", "an_tail_fwd", "an_affine",
             "an_row_dots", "an_tail_bwd", "an_linbn_bwd", "an_site_coefs", "an_affine_grad",
             "an_running")  # fmt: skip
    return {name: getattr(lib, f"{name}_{suffix}") for name in names}


def _buffers_fit(bn: nn.Module, dtype: torch.dtype) -> bool:
    """``bn``'s running statistics, where it has them, are contiguous CPU tensors of ``dtype``
    (what ``an_running`` writes)."""
    return all(
        t is None or (t.dtype == dtype and t.is_contiguous() and t.is_cpu)
        for t in (bn.running_mean, bn.running_var)
    )


def _tracks(bn: nn.Module) -> bool:
    return bn.track_running_stats and bn.running_mean is not None


def cpu_site(an: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The training-mode output of AttentiveNorm ``an`` for ``x`` (B, C, *) as one autograd
    node, updating its running statistics; None where it does not apply (see the module)."""
    cfg = _config(an, x)
    if cfg is None:
        return None
    mods = an._modules
    norm, head = mods["norm"], mods["attn"]._modules["head"]._modules
    fc, hbn = head["fc"], head["norm"]
    y, hmean, hvar, mean, var = _Site.apply(
        x, fc.weight, hbn.weight, hbn.bias, an.weight, an.bias, cfg
    )
    fns, (b, _, n, _) = cfg[0], cfg[1]
    with torch.no_grad():
        if _tracks(hbn):
            _running(fns, hbn, hmean, hvar, b)
        if an.training and _tracks(norm):
            _running(fns, norm, mean, var, b * n)
    return y


def _config(an: nn.Module, x: torch.Tensor) -> tuple | None:
    """``_Site``'s ``cfg`` for this layer and input, or None where the node does not apply."""
    mods = an._modules
    norm, attn = mods["norm"], mods["attn"]
    pool, head = attn._modules["pool"], attn._modules["head"]._modules
    fc, hbn, gate = head.get("fc"), head.get("norm"), head.get("gate")
    kind = _GATES.get(type(gate))
    if type(norm) not in _BATCHNORMS or not (an.training or norm.running_mean is None):
        return None
    if type(pool) not in (MeanStdPool, AvgPool) or len(head) != 3 or kind is None:
        return None
    if type(fc) is not nn.Linear or fc.bias is not None or type(hbn) is not nn.BatchNorm1d:
        return None
    if kind == "softmax" and gate.dim not in (1, -1):
        return None
    if not hbn.training or not hbn.affine or x.dim() < 2 or x.shape[0] < 2:
        return None
    if type(x) is not torch.Tensor or not x.is_cpu or not x.is_contiguous():
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    if torch._C._len_torch_dispatch_stack() or torch.is_autocast_enabled("cpu"):
        return None
    fns = _kernels(x.dtype)
    params = (fc.weight, hbn.weight, hbn.bias, an.weight, an.bias)
    if fns is None or any(p.dtype != x.dtype or not p.is_contiguous() for p in params):
        return None
    if not (_buffers_fit(norm, x.dtype) and _buffers_fit(hbn, x.dtype)):
        return None
    b, c = x.shape[:2]
    n = x.numel() // (b * c)
    if n == 0:
        return None
    k = fc.weight.shape[0]
    eps = (n / max(n - 1, 1), getattr(pool, "eps", 0.0), hbn.eps, norm.eps)
    return fns, (b, c, n, k), eps, type(pool) is MeanStdPool, kind
