"""A BatchNorm-based AttentiveNorm site on a GPU as ten Triton launches (``_triton_kernels.py``,
``_triton_head.py``).

Eager AN on a GPU is bound by kernel launches and Python: a site ran ~30 small ops and
autograd nodes, 1.3-1.7 ms per training step at batch 32 on an H200 against BatchNorm2d's
0.3-0.5 ms, whatever the feature map's size. Here a site is one autograd node whose forward
is five kernels (moments, per-channel statistics + logits, head, mixtures, affine) and whose
backward is five more; running statistics and ``num_batches_tracked`` (site and head) are
updated inside the kernels, with ``nn.BatchNorm``'s semantics.

Covered (``_triton_spec.py``): an inner ``nn.BatchNorm1d/2d/3d`` (not Sync, not frozen), the
three pools, every head of :data:`~.heads.HEADS` (one or two linear layers,
BatchNorm1d or GroupNorm(1, width) or no norm, ReLU between, any of the three gates), K <= 64,
batch <= 128, contiguous or channels-last float32/float16/bfloat16 feature maps with float32
parameters (bfloat16 autocast included).

On by default for eager CUDA training steps on Ampere and later GPUs (:func:`triton_wanted`):
on an H100, batch 64, AN-ResNet-50's training step took 0.88-0.89x the time of the plain ops in
float32 and 0.78-0.80x under bfloat16 autocast (two machines), while its inference took 1.08x
(float32) and 1.00x of the folded eval site (``_device_eval.py``), which evaluation keeps.
``AN_SEARCH_TRITON=1`` takes the kernels in evaluation too, ``0`` never; ``an.triton`` (True
or False) wins over both. Each launch goes through :func:`~._triton_launch.launch`, which
calls the compiled kernel's launcher directly once its specialisation is known.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ._autograd import first_order
from ._fused import bessel
from ._norm_stats import mark_updated
from ._triton_launch import launch
from ._triton_spec import CL_FORMATS, POOLS, Site, pow2, site

__all__ = ["ENV", "triton_available", "triton_site", "triton_wanted"]

ENV = "AN_SEARCH_TRITON"  # "1": eager CUDA sites always take the Triton kernels, "0": never
_FLAT_BLOCK = 1024
_CL_TILE = (64, 32)  # positions x channels a step of the channels-last row kernels
_WARPS = 8  # for the tiled kernels: 4 warps spill registers at batch 64, K 20 (sm_90 cubins)
_state: dict[str, tuple[ModuleType, ModuleType] | None] = {}


def triton_wanted(flag: bool | None, training: bool, device: torch.device) -> bool:
    """Whether an eager site takes the Triton kernels: ``flag`` (``an.triton``) where set, else
    ``AN_SEARCH_TRITON`` where it is "1" (always) or "0" (never), else in training only, on
    GPUs of compute capability 8.0 and up (Ampere on, as bfloat16 needs; run on sm_90)."""
    if flag is not None:
        return flag
    env = os.environ.get(ENV)
    if env in ("0", "1"):
        return env == "1"
    return training and (device.type != "cuda" or _ampere_on(device.index))


@functools.cache
def _ampere_on(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8


def triton_available() -> bool:
    """Triton imports (its kernels are compiled on first use)."""
    return _kernels() is not None


def _kernels() -> tuple[ModuleType, ModuleType] | None:
    """The (feature-map and (B, C), head) kernel modules, imported on first use."""
    if "k" not in _state:
        try:
            _state["k"] = (
                importlib.import_module("an_search.layers._triton_kernels"),
                importlib.import_module("an_search.layers._triton_head"),
            )
        except ImportError:
            _state["k"] = None
    return _state["k"]


def _head_warps(s: Site) -> int:
    """Warps of the one-program head kernels: 16 from (128, 64) arrays up, where 8 spill."""
    bb, _, bh, bk = s.blocks
    return 16 if bb * max(bh, bk) >= 8192 else _WARPS


def _flat(x: torch.Tensor) -> tuple[int]:
    """The grid of the flat kernels over ``x``."""
    return (-(-x.numel() // _FLAT_BLOCK),)


def _row_tile(n: int) -> tuple[int, int]:
    """(rows per program, positions per step) of the row kernels: about 4096 values a step."""
    block_n = min(1024, max(16, pow2(n)))
    return max(1, min(64, 4096 // block_n)), block_n


def _per_row(
    s: Site,
    row_kernel: Any,
    cl_kernel: Any,  # a Triton kernel (or a recorder, triton_aot.py)
    b: int,
    c: int,
    *ptrs: torch.Tensor,
    **flags: bool,
) -> None:
    """Launch a reduction over the positions of every (sample, channel): ``row_kernel`` on
    (B*C, N) maps, ``cl_kernel`` on channels-last (B, N, C) ones."""
    if s.cl:
        grid = (b, -(-c // _CL_TILE[1]))
        launch(cl_kernel, grid, *ptrs, b, c, s.n, **flags, BLOCK_N=_CL_TILE[0],
               BLOCK_C=_CL_TILE[1], num_warps=_WARPS)  # fmt: skip
    else:
        rows, block_n = _row_tile(s.n)
        grid = (-(-b * c // rows),)
        launch(row_kernel, grid, *ptrs, b * c, s.n, **flags, R=rows, BLOCK_N=block_n,
               num_warps=_WARPS)  # fmt: skip


@dataclass
class _Derived:
    """What a site's launches compute from its description alone, once per :class:`Site`."""

    b: int
    c: int
    k: int
    h: int  # layer 1's width
    nblk: int  # channel blocks of the (B, C) kernels
    peak: bool  # avgmax: each row's maximum and its count too
    fwd: list[int]  # workspace sections (see _carve) of the forward's float32 buffers
    bwd: list[int]  # and of the backward's
    n_corr: float  # n / (n - 1): the pool's unbiased variance
    count_corr: float  # the same over the batch's B * n values


def _sections(*numels: int) -> list[int]:
    """``split_with_sizes`` sections of a workspace holding buffers of ``numels`` values, each
    followed by its padding to 16 values: every buffer starts on a 64-byte boundary (Triton
    specialises pointers on 16 bytes; the direct launches need them so)."""
    return [v for n in numels for v in (n, -n % 16)]


def _carve(sections: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The float32 buffers of :func:`_sections` (1-d), views of one allocation: an allocation
    each cost a site's step 21 calls to the allocator."""
    ws = torch.empty(sum(sections), device=device, dtype=torch.float32)
    return ws.split_with_sizes(sections)[::2]


def _derive(s: Site, x: torch.Tensor) -> _Derived:
    if isinstance(s.derived, _Derived):
        return s.derived
    b, c, k, n, h = x.shape[0], x.shape[1], s.an.weight.shape[0], s.n, s.width
    bb, bc, bh, bk = s.blocks
    nblk, peak, two = -(-c // bc), POOLS[s.an.pool_name] == 2, len(s.layers) == 2
    _, hk = _kernels()
    ws1, ws2 = hk.workspace_size(bb, bh), hk.workspace_size(bb, bk) if two else 0
    bc_ = b * c
    fwd = _sections(bc_, bc_, *((bc_, bc_) if peak else ()), nblk * bb * bh, c, c, ws1, ws2,
                    bb * bk, bc_, bc_)  # fmt: skip
    bwd = _sections(bc_, bc_, k * c, k * c, nblk * bb * bk, bc_, bc_, bh, bh, bh,
                    *((bk, bk, bk, k * h) if two else ()), bb * bh, h * c,
                    *((bc_,) if peak else ()))  # fmt: skip
    count = b * n
    s.derived = _Derived(b, c, k, h, nblk, peak, fwd, bwd, bessel(n),
                         bessel(count))  # fmt: skip
    return s.derived


def _forward(s: Site, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    kern, hk = _kernels()
    d = _derive(s, x)
    an, bn = s.an, s.bn
    b, c, k, n, h, nblk = d.b, d.c, d.k, s.n, d.h, d.nblk
    bb, bc, bh, bk = s.blocks
    bufs = _carve(d.fwd, x.device)
    m, v = bufs[0], bufs[1]
    mx, cnt = (bufs[2], bufs[3]) if d.peak else (m, m)
    part, mean, r, ws1, ws2, lam, scale, shift = bufs[4:] if d.peak else bufs[2:]
    ws2 = ws2 if len(s.layers) == 2 else ws1
    _per_row(s, kern.moments_kernel, kern.moments_cl_kernel, b, c, x, m, v, mx, cnt, MAX=d.peak)
    buffers = bn._buffers
    rm, rv, nbt = buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"]
    one, two = s.layers[0], s.layers[-1]
    launch(
        kern.channels_kernel, (nblk,),
        m, v, mx, one.weight, part, mean, r, rm if rm is not None else mean,
        rv if rv is not None else r, nbt if nbt is not None else m,
        b, c, h, n, bn.eps, bn.momentum or 0.0, d.n_corr, s.pool_eps, d.count_corr,
        USE_RUNNING=s.use_running, UPDATE=s.update,
        CUMULATIVE=bn.momentum is None and nbt is not None,
        POOL=POOLS[an.pool_name], BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bh,
        num_warps=_WARPS,
    )  # fmt: skip
    b1, n1 = one.bias if one.bias is not None else part, one.args(part)
    b2, n2 = two.bias if two.bias is not None else part, two.args(part)
    bias1, norm1, upd1, cum1 = one.flags()
    bias2, norm2, upd2, cum2 = two.flags()
    site_count = s.update and nbt is not None
    launch(
        hk.head_kernel, (1,),
        part, nblk, b1, *n1, ws1, two.weight, b2, *n2, ws2, nbt if site_count else part,
        lam, b, h, k, *one.scalars(), *two.scalars(), bessel(b),
        LAYERS=len(s.layers), BIAS1=bias1, NORM1=norm1, UPD1=upd1, CUM1=cum1, BIAS2=bias2,
        NORM2=norm2, UPD2=upd2, CUM2=cum2, SITE_COUNT=site_count, GATE=s.gate,
        BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
        num_warps=_head_warps(s),
    )  # fmt: skip
    launch(
        kern.mix_kernel, (nblk,),
        lam, an.weight, an.bias, mean, r, scale, shift, b, c, k,
        BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
        num_warps=_WARPS,
    )  # fmt: skip
    y = torch.empty_like(x)
    launch(kern.affine_kernel, _flat(x), x, y, scale, shift, x.numel(), n, c, CL=s.cl,
           BLOCK=_FLAT_BLOCK)  # fmt: skip
    if s.updated:
        mark_updated(*s.updated)  # (the kernels wrote them)
    return y, (m, v, mx, cnt, mean, r, lam, ws1, ws2, scale)


def _backward(s: Site, saved: tuple[torch.Tensor | None, ...], g: torch.Tensor) -> list:
    """Gradients of (x, Gamma, Beta, *:func:`~._triton_spec.head_params`)."""
    kern, hk = _kernels()
    x, wm, bm, w1, n1w, w2, n2w, m, v, mx, cnt, mean, r, lam, ws1, ws2, scale = saved
    d = _derive(s, x)
    b, c, k, n, h, nblk = d.b, d.c, d.k, s.n, d.h, d.nblk
    bb, bc, bh, bk = s.blocks
    two_layers = len(s.layers) == 2
    g = g.contiguous(memory_format=CL_FORMATS[x.dim()] if s.cl else torch.contiguous_format)
    bufs = list(_carve(d.bwd, x.device))
    ga, gt, g_wm, g_bm, part, gm, gv = bufs[:7]
    grads1 = bufs[7:10]  # norm weight, norm bias, bias
    rest = bufs[10:]
    grads2, g_w2 = (rest[:3], rest[3]) if two_layers else (grads1, part)
    gh1, g_w1 = rest[-3:-1] if d.peak else rest[-2:]
    gmx = rest[-1] if d.peak else gm
    _per_row(s, kern.rowdots_kernel, kern.rowdots_cl_kernel, b, c, g, x, ga, gt)
    launch(
        kern.tail_bwd_kernel, (nblk,),
        ga, gt, lam, wm, bm, m, mean, r, scale, g_wm, g_bm, part, gm, gv, b, c, k,
        BATCH_STATS=not s.use_running, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
        num_warps=_WARPS,
    )  # fmt: skip
    one, two = s.layers[0], s.layers[-1]
    launch(
        hk.head_bwd_kernel, (1,),
        part, nblk, lam, ws1, n1w if n1w is not None else part, *grads1,
        ws2, w2 if w2 is not None else part, n2w if n2w is not None else part, *grads2, g_w2,
        gh1, b, h, k,
        LAYERS=len(s.layers), BIAS1=one.bias is not None, NORM1=one.code,
        BIAS2=two.bias is not None, NORM2=two.code, GATE=s.gate,
        BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
        num_warps=_head_warps(s),
    )  # fmt: skip
    launch(
        kern.pool_bwd_kernel, (nblk,),
        gh1, w1, m, v, mx, cnt, gm, gv, gmx, g_w1, b, c, h, n, d.n_corr,
        s.pool_eps, POOL=POOLS[s.an.pool_name],
        BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bh,
        num_warps=_WARPS,
    )  # fmt: skip
    dx = torch.empty_like(x)  # cc, dd: in gv, gm
    launch(
        kern.dx_kernel, _flat(x),
        g, x, scale, gv, gm, mx, gmx, dx, x.numel(), n, c, CL=s.cl, MAX=d.peak,
        BLOCK=_FLAT_BLOCK,
    )  # fmt: skip
    out = [dx, g_wm.view(k, c), g_bm.view(k, c)]
    for i, g_w, (g_nw, g_nb, g_b), width in ((0, g_w1, grads1, h), (1, g_w2, grads2, k)):
        if i == len(s.layers):
            out += [None] * 4
            continue
        layer = s.layers[i]
        has_norm = layer.norm is not None
        out += [g_w.view(width, -1), g_b[:width] if layer.bias is not None else None,
                g_nw[:width] if has_norm else None, g_nb[:width] if has_norm else None]  # fmt: skip
    return out


class _TritonSite(torch.autograd.Function):
    """(x, Gamma, Beta, *:func:`~._triton_spec.head_params`) -> y."""

    @staticmethod
    def forward(ctx, s: Site, x, wm, bm, *head):  # type: ignore[override]
        y, bufs = _forward(s, x)
        w1, _, n1w, _, w2, _, n2w, _ = head
        ctx.save_for_backward(x, wm, bm, w1, n1w, w2, n2w)  # (in-place edits: caught)
        ctx.bufs, ctx.site = bufs, s  # the site's own buffers, seen by nothing else
        return y

    @staticmethod
    @first_order
    def backward(ctx, g):  # type: ignore[override]
        return None, *_backward(ctx.site, (*ctx.saved_tensors, *ctx.bufs), g)


def triton_site(an: nn.Module, x: torch.Tensor, block_c: int | None = None) -> torch.Tensor | None:
    """``an(x)`` before its drop/activation, by the Triton kernels; None where they do not
    apply (see the module doc) or Triton is missing. Any device Triton runs on: CUDA, or the
    CPU under ``TRITON_INTERPRET=1`` (tests). ``block_c``: channels per block (tests)."""
    if _kernels() is None:
        return None
    s = site(an, x, block_c)
    if s is None:
        return None
    params = s.params
    if torch.is_grad_enabled() and (
        x.requires_grad or any(t.requires_grad for t in params if t is not None)
    ):
        return _TritonSite.apply(s, x, *params)
    return _forward(s, x)[0]
