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
float32/float64 inputs, contiguous or channels-last (the passes over the map then take
``_native_cl.c``'s kernels), and parameters of one dtype, batch >= 2, no graph capture,
dispatch mode or autocast. Anything else returns None: the fused path runs as before (same
kernels, same numerics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._autograd import first_order
from ._fused import bessel
from ._native import _suffix, as_layout_of, channels_last_map, library
from ._norm_stats import mark_updated
from .pooling import AvgPool, MeanStdPool

__all__ = ["cpu_site"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_GATES = {nn.Hardsigmoid: "hsigmoid", nn.Sigmoid: "sigmoid", nn.Softmax: "softmax"}
_POOLS = (MeanStdPool, AvgPool)
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")
_WS_BC = ("m", "v", "pooled", "s", "gamma", "scale", "shift")
_WS_BK = ("z_ptr", "hhat")
_WS_K = ("hmean", "hvar", "hr")
_WS_C = ("mean", "var", "r")
_FNS: dict[tuple[object, str], dict] = {}  # (library, dtype suffix) -> its kernels
# The passes over the map, in a row-wise (B * C, n) and a channels-last (B, n, C) version of
# the same arguments but the sizes: (map pointers..., *sizes, threads).
_PASSES = ("an_moments", "an_affine", "an_row_dots", "an_affine_grad")


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


class _Workspace:
    """The forward's workspace, one tensor of x's dtype, and the addresses of its arrays:
    (B, C) m, v, pooled, s, gamma, scale, shift; (B, K) z_ptr, hhat; (K) hmean, hvar, hr;
    (C) mean, var, r; and ``z``, the logits' (B, K) tensor view. The backward reads it back
    through the same layout."""

    __slots__ = ("tensor", "z", *_WS_BC, *_WS_BK, *_WS_K, *_WS_C)

    def __init__(self, tensor: torch.Tensor, b: int, c: int, k: int) -> None:
        self.tensor, size, at = tensor, tensor.element_size(), tensor.data_ptr()
        for names, length in _groups(b, c, k):
            for name in names:
                setattr(self, name, at)
                at += length * size
        start = len(_WS_BC) * b * c
        self.z = tensor[start : start + b * k].view(b, k)

    @classmethod
    def new(cls, x: torch.Tensor, b: int, c: int, k: int) -> _Workspace:
        numel = sum(len(names) * length for names, length in _groups(b, c, k))
        return cls(x.new_empty(numel), b, c, k)


def _groups(b: int, c: int, k: int) -> tuple[tuple[tuple[str, ...], int], ...]:
    return (_WS_BC, b * c), (_WS_BK, b * k), (_WS_K, k), (_WS_C, c)


class _Site(torch.autograd.Function):
    """(x, W, gw, gb, Wm, Bm) -> y; ``cfg`` holds the library's kernels for the dtype, the
    sizes, the eps, the pool's and gate's kinds, and the running statistics to update (the
    head's BatchNorm1d, the site's BatchNorm: ``an_running``'s arguments or None)."""

    @staticmethod
    def forward(ctx, x, w, gw, gb, wm, bm, cfg):  # type: ignore[override]
        fns, (b, c, n, k), (bessel, pool_eps, head_eps, eps), meanstd, gate, runs = cfg[:6]
        (moments, affine, _, _), cl = cfg[6:]
        threads, sizes = torch.get_num_threads(), ((b, n, c) if cl else (b * c, n))
        ws = _Workspace.new(x, b, c, k)
        if moments(x.data_ptr(), *sizes, ws.m, ws.v, threads) and cl:
            raise MemoryError("AttentiveNorm moments: no memory for the kernel's workspace")
        if meanstd:
            fns["an_meanstd_fwd"](ws.m, ws.v, b * c, bessel, pool_eps, ws.pooled, ws.s)
        stat = ws.pooled if meanstd else ws.m
        fns["an_linbn_fwd"](stat, w.data_ptr(), gw.data_ptr(), gb.data_ptr(), b, c, k, head_eps,
                            ws.z_ptr, ws.hhat, ws.hmean, ws.hvar, ws.hr)  # fmt: skip
        if runs[0] is not None:
            fns["an_running"](*runs[0][:3], ws.hmean, ws.hvar, k, *runs[0][3:])
        lam = _gate(gate, ws.z)
        ins = (lam.data_ptr(), wm.data_ptr(), bm.data_ptr(), ws.m, ws.v)
        outs = (ws.gamma, ws.scale, ws.shift, ws.mean, ws.var, ws.r)
        if fns["an_tail_fwd"](*ins, b, c, k, eps, *outs):
            raise MemoryError("AttentiveNorm batch statistics: out of memory")
        if runs[1] is not None:
            fns["an_running"](*runs[1][:3], ws.mean, ws.var, c, *runs[1][3:])
        y = torch.empty_like(x)
        affine(x.data_ptr(), ws.scale, ws.shift, y.data_ptr(), *sizes, threads)
        ctx.save_for_backward(x, w, gw, wm, bm, ws.tensor, lam)
        ctx.cfg = cfg
        return y

    @staticmethod
    @first_order
    def backward(ctx, gy):  # type: ignore[override]
        x, w, gw, wm, bm, saved, lam = ctx.saved_tensors
        fns, (b, c, n, k), (bessel, *_eps), meanstd, gate, _ = ctx.cfg[:6]
        (_, _, row_dots, affine_grad), cl = ctx.cfg[6:]
        threads, bc = torch.get_num_threads(), b * c
        sizes = (b, n, c) if cl else (bc, n)
        ws = _Workspace(saved, b, c, k)
        gy = as_layout_of(gy, x)
        # backward workspace: sgx, sg, g_m, g_v, g_p, cc, dd | g_lam
        gws = x.new_empty(7 * bc + b * k)
        g0, size = gws.data_ptr(), x.element_size()
        sgx, sg, g_m, g_v, g_p, cc, dd = (g0 + i * bc * size for i in range(7))
        row_dots(gy.data_ptr(), x.data_ptr(), sgx, sg, *sizes, threads)
        g_wm, g_bm, g_w = torch.empty_like(wm), torch.empty_like(bm), torch.empty_like(w)
        g_gw, g_gb = torch.empty_like(gw), torch.empty_like(gw)
        outs = (g0 + 7 * bc * size, g_wm.data_ptr(), g_bm.data_ptr(), g_m, g_v)
        ins = (lam.data_ptr(), wm.data_ptr(), bm.data_ptr(), ws.m, ws.mean, ws.gamma, ws.r)
        if fns["an_tail_bwd"](sgx, sg, *ins, ws.scale, b, c, k, *outs):
            raise MemoryError("AttentiveNorm batch statistics: out of memory")
        g_z = _gate_grad(gate, gws[7 * bc :].view(b, k), ws.z, lam).contiguous()
        stat = ws.pooled if meanstd else ws.m
        ins = (g_z.data_ptr(), stat, w.data_ptr(), gw.data_ptr(), ws.hhat, ws.hr)
        if fns["an_linbn_bwd"](*ins, b, c, k, g_p, g_w.data_ptr(), g_gw.data_ptr(),
                               g_gb.data_ptr()):  # fmt: skip
            raise MemoryError("AttentiveNorm head: out of memory")
        gx = None
        if ctx.needs_input_grad[0]:
            fns["an_site_coefs"](g_m, g_v, g_p, ws.m, ws.s, bc, n, bessel, meanstd, cc, dd)
            gx = torch.empty_like(x)
            affine_grad(gy.data_ptr(), x.data_ptr(), ws.scale, cc, dd, gx.data_ptr(), *sizes,
                        threads)  # fmt: skip
        return gx, g_w, g_gw, g_gb, g_wm, g_bm, None


def _kernels(dtype: torch.dtype) -> dict | None:
    """The library's kernels for ``dtype`` by name (looked up once per library and dtype)."""
    lib, suffix = library(), _suffix(dtype)
    if lib is None or suffix is None:
        return None
    fns = _FNS.get((lib, suffix))
    if fns is None:
        names = ("an_meanstd_fwd", "an_linbn_fwd", "an_tail_fwd", "an_tail_bwd",
                 "an_linbn_bwd", "an_site_coefs", "an_running",
                 *_PASSES, *(f"{name}_cl" for name in _PASSES))  # fmt: skip
        fns = _FNS[(lib, suffix)] = {name: getattr(lib, f"{name}_{suffix}") for name in names}
    return fns


def _run(bn: nn.Module, dtype: torch.dtype, count: int) -> tuple | bool | None:
    """``an_running``'s arguments but the statistics (running mean, running var, counter;
    momentum, or -1 for the cumulative average; values per channel) where ``bn`` keeps
    running statistics, None where it does not, False where C cannot write them."""
    buffers = bn._buffers
    mean, var, counter = (buffers.get(name) for name in _RUNNING)
    if not bn.track_running_stats or mean is None:
        return None
    for t in (mean, var):
        if type(t) is not torch.Tensor or t.dtype != dtype or not t.is_contiguous() or not t.is_cpu:
            return False
    momentum = -1.0 if bn.momentum is None else float(bn.momentum)
    counter = None if counter is None else counter.data_ptr()
    return mean.data_ptr(), var.data_ptr(), counter, momentum, float(count)


def cpu_site(an: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The training-mode output of AttentiveNorm ``an`` for ``x`` (B, C, *) as one autograd
    node, updating its running statistics; None where it does not apply (see the module)."""
    if not an.training or type(x) is not torch.Tensor or not x.is_cpu or x.dim() < 2:
        return None
    cl = channels_last_map(x)  # channels-last maps take _native_cl.c's kernels
    if not cl and not x.is_contiguous():
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    if torch._C._len_torch_dispatch_stack() or torch.is_autocast_enabled("cpu"):
        return None
    mods = an._modules
    norm, attn = mods["norm"], mods["attn"]._modules
    pool, head = attn["pool"], attn["head"]._modules
    fc, hbn, gate = head.get("fc"), head.get("norm"), head.get("gate")
    kind = _GATES.get(type(gate))
    if type(norm) not in _BATCHNORMS or type(pool) not in _POOLS or len(head) != 3 or not kind:
        return None
    if not norm.training:
        return None  # frozen by norm.eval() in a training model: running statistics normalise
    if type(fc) is not nn.Linear or type(hbn) is not nn.BatchNorm1d or not hbn.training:
        return None
    if fc.bias is not None or not hbn.affine or x.shape[0] < 2:
        return None
    if kind == "softmax" and gate.dim not in (1, -1):
        return None
    if norm._forward_pre_hooks or fc._forward_pre_hooks or hbn._forward_pre_hooks:
        return None  # (torch.nn.utils.prune's: the weights are made by calling the module)
    weights = (fc.weight, hbn.weight, hbn.bias, an.weight, an.bias)  # (an's: its hooks ran)
    dtype, fns = x.dtype, _kernels(x.dtype)
    if fns is None or any(p.dtype != dtype or not p.is_contiguous() for p in weights):
        return None
    b, c = x.shape[:2]
    n = x.numel() // (b * c)
    runs = (_run(hbn, dtype, b), _run(norm, dtype, b * n))
    if n == 0 or False in runs:
        return None
    eps = (bessel(n), getattr(pool, "eps", 0.0), hbn.eps, norm.eps)
    k = weights[0].shape[0]
    passes = tuple(fns[f"{name}_cl" if cl else name] for name in _PASSES)
    cfg = (fns, (b, c, n, k), eps, type(pool) is MeanStdPool, kind, runs, passes, cl)
    y = _Site.apply(x, *weights, cfg)
    mark_updated(*(bn for bn, run in zip((hbn, norm), runs, strict=True) if run is not None))
    return y
