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
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._norm_stats import mark_updated
from ._triton_launch import launch
from ._triton_spec import CL_FORMATS, POOLS, Site, head_params, pow2, site

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


def _forward(s: Site, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    kern, hk = _kernels()
    an, bn = s.an, s.bn
    b, c, k, n, h = x.shape[0], x.shape[1], an.weight.shape[0], s.n, s.width
    bb, bc, bh, bk = s.blocks
    nblk = -(-c // bc)
    f32 = {"device": x.device, "dtype": torch.float32}
    m, v = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    peak = POOLS[an.pool_name] == 2  # avgmax: each row's maximum and its count too
    mx, cnt = (torch.empty(b, c, **f32), torch.empty(b, c, **f32)) if peak else (m, m)
    _per_row(s, kern.moments_kernel, kern.moments_cl_kernel, b, c, x, m, v, mx, cnt, MAX=peak)
    part = torch.empty(nblk, bb, bh, **f32)
    mean, r = torch.empty(c, **f32), torch.empty(c, **f32)
    count, nbt = b * n, bn.num_batches_tracked
    launch(
        kern.channels_kernel, (nblk,),
        m, v, mx, s.layers[0].fc.weight, part, mean, r,
        bn.running_mean if bn.running_mean is not None else mean,
        bn.running_var if bn.running_var is not None else r, nbt if nbt is not None else m,
        b, c, h, n, bn.eps, bn.momentum or 0.0, n / max(n - 1, 1),
        getattr(an.attn.pool, "eps", 0.0), count / max(count - 1, 1),
        USE_RUNNING=s.use_running, UPDATE=s.update,
        CUMULATIVE=bn.momentum is None and nbt is not None,
        POOL=POOLS[an.pool_name], BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bh,
        num_warps=_WARPS,
    )  # fmt: skip
    one, two = s.layers[0], s.layers[-1]
    ws1 = torch.empty(hk.workspace_size(bb, bh), **f32)
    ws2 = torch.empty(hk.workspace_size(bb, bk), **f32) if len(s.layers) == 2 else ws1
    lam = torch.empty(bb, bk, **f32)
    b1, n1 = one.fc.bias if one.fc.bias is not None else part, one.args(part)
    b2, n2 = two.fc.bias if two.fc.bias is not None else part, two.args(part)
    bias1, norm1, upd1, cum1 = one.flags()
    bias2, norm2, upd2, cum2 = two.flags()
    site_count = s.update and nbt is not None
    launch(
        hk.head_kernel, (1,),
        part, nblk, b1, *n1, ws1, two.fc.weight, b2, *n2, ws2, nbt if site_count else part,
        lam, b, h, k, *one.scalars(), *two.scalars(), b / max(b - 1, 1),
        LAYERS=len(s.layers), BIAS1=bias1, NORM1=norm1, UPD1=upd1, CUM1=cum1, BIAS2=bias2,
        NORM2=norm2, UPD2=upd2, CUM2=cum2, SITE_COUNT=site_count, GATE=s.gate,
        BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
        num_warps=_head_warps(s),
    )  # fmt: skip
    scale, shift = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    launch(
        kern.mix_kernel, (nblk,),
        lam, an.weight, an.bias, mean, r, scale, shift, b, c, k,
        BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
        num_warps=_WARPS,
    )  # fmt: skip
    y = torch.empty_like(x)
    launch(kern.affine_kernel, _flat(x), x, y, scale, shift, x.numel(), n, c, CL=s.cl,
           BLOCK=_FLAT_BLOCK)  # fmt: skip
    updated = [layer.norm for layer in s.layers if layer.update]  # the head's BatchNorm1d
    mark_updated(*([bn] if s.update else []), *updated)  # (the kernels wrote them)
    return y, (m, v, mx, cnt, mean, r, lam, ws1, ws2, scale)


def _backward(s: Site, saved: tuple[torch.Tensor | None, ...], g: torch.Tensor) -> list:
    """Gradients of (x, Gamma, Beta, *:func:`~._triton_spec.head_params`)."""
    kern, hk = _kernels()
    x, wm, bm, w1, n1w, w2, n2w, m, v, mx, cnt, mean, r, lam, ws1, ws2, scale = saved
    b, c, k, n, h = x.shape[0], x.shape[1], wm.shape[0], s.n, s.width
    bb, bc, bh, bk = s.blocks
    nblk = -(-c // bc)
    f32 = {"device": x.device, "dtype": torch.float32}
    g = g.contiguous(memory_format=CL_FORMATS[x.dim()] if s.cl else torch.contiguous_format)
    ga, gt = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    _per_row(s, kern.rowdots_kernel, kern.rowdots_cl_kernel, b, c, g, x, ga, gt)
    g_wm, g_bm = torch.empty(k, c, **f32), torch.empty(k, c, **f32)
    part = torch.empty(nblk, bb, bk, **f32)
    gm, gv = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    launch(
        kern.tail_bwd_kernel, (nblk,),
        ga, gt, lam, wm, bm, m, mean, r, scale, g_wm, g_bm, part, gm, gv, b, c, k,
        BATCH_STATS=not s.use_running, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
        num_warps=_WARPS,
    )  # fmt: skip
    one, two = s.layers[0], s.layers[-1]
    two_layers = len(s.layers) == 2
    grads1 = [torch.empty(bh, **f32) for _ in range(3)]  # norm weight, norm bias, bias
    grads2 = [torch.empty(bk, **f32) for _ in range(3)] if two_layers else grads1
    g_w2 = torch.empty(k, h, **f32) if two_layers else part
    gh1 = torch.empty(bb, bh, **f32)
    launch(
        hk.head_bwd_kernel, (1,),
        part, nblk, lam, ws1, n1w if n1w is not None else part, *grads1,
        ws2, w2 if w2 is not None else part, n2w if n2w is not None else part, *grads2, g_w2,
        gh1, b, h, k,
        LAYERS=len(s.layers), BIAS1=one.fc.bias is not None, NORM1=one.code,
        BIAS2=two.fc.bias is not None, NORM2=two.code, GATE=s.gate,
        BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
        num_warps=_head_warps(s),
    )  # fmt: skip
    g_w1 = torch.empty(h, c, **f32)
    peak = POOLS[s.an.pool_name] == 2
    gmx = torch.empty(b, c, **f32) if peak else gm
    launch(
        kern.pool_bwd_kernel, (nblk,),
        gh1, w1, m, v, mx, cnt, gm, gv, gmx, g_w1, b, c, h, n, n / max(n - 1, 1),
        getattr(s.an.attn.pool, "eps", 0.0), POOL=POOLS[s.an.pool_name],
        BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bh,
        num_warps=_WARPS,
    )  # fmt: skip
    dx = torch.empty_like(x)  # cc, dd: in gv, gm
    total = x.numel()
    launch(
        kern.dx_kernel, _flat(x),
        g, x, scale, gv, gm, mx, gmx, dx, total, n, c, CL=s.cl, MAX=peak, BLOCK=_FLAT_BLOCK,
    )  # fmt: skip
    out = [dx, g_wm, g_bm]
    for i, g_w, (g_nw, g_nb, g_b), width in ((0, g_w1, grads1, h), (1, g_w2, grads2, k)):
        if i == len(s.layers):
            out += [None] * 4
            continue
        layer = s.layers[i]
        has_norm = layer.norm is not None
        out += [g_w, g_b[:width] if layer.fc.bias is not None else None,
                g_nw[:width] if has_norm else None, g_nb[:width] if has_norm else None]  # fmt: skip
    return out


class _TritonSite(torch.autograd.Function):
    """(x, Gamma, Beta, *:func:`~._triton_spec.head_params`) -> y."""

    @staticmethod
    def forward(ctx, s: Site, x, wm, bm, *head):  # type: ignore[override]
        y, saved = _forward(s, x)
        w1, _, n1w, _, w2, _, n2w, _ = head
        ctx.save_for_backward(x, wm, bm, w1, n1w, w2, n2w, *saved)  # (in-place edits: caught)
        ctx.site = s
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        return None, *_backward(ctx.site, ctx.saved_tensors, g)


def triton_site(an: nn.Module, x: torch.Tensor, block_c: int | None = None) -> torch.Tensor | None:
    """``an(x)`` before its drop/activation, by the Triton kernels; None where they do not
    apply (see the module doc) or Triton is missing. Any device Triton runs on: CUDA, or the
    CPU under ``TRITON_INTERPRET=1`` (tests). ``block_c``: channels per block (tests)."""
    if _kernels() is None:
        return None
    s = site(an, x, block_c)
    if s is None:
        return None
    params = [an.weight, an.bias, *head_params(s)]
    tracked = [t for t in (x, *params) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _TritonSite.apply(s, x, *params)
    return _forward(s, x)[0]
