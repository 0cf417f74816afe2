"""A BatchNorm-based AttentiveNorm site on a GPU as ten Triton launches (``_triton_kernels.py``).

Eager AN on a GPU is bound by kernel launches and Python: a site ran ~30 small ops and
autograd nodes, 1.3-1.7 ms per training step at batch 32 on an H200 against BatchNorm2d's
0.3-0.5 ms, whatever the feature map's size. Here a site is one autograd node whose forward
is five kernels (moments, per-channel statistics + logits, head, mixtures, affine) and whose
backward is five more; running statistics and ``num_batches_tracked`` (site and head) are
updated inside the kernels, with ``nn.BatchNorm``'s semantics.

Covered: an inner ``nn.BatchNorm1d/2d/3d`` (not Sync, not frozen), the ``meanstd`` and ``avg``
pools, the linear heads with or without a norm (``default``, ``bn-sigmoid``, ``bn-softmax``,
``gn-hsigmoid``, ``linear-sigmoid``, ``linear-hsigmoid``), K <= 64, batch <= 256, contiguous
or channels-last float32/float16/bfloat16 feature maps with float32 parameters (bfloat16
autocast included).

Opt-in (``AN_SEARCH_TRITON=1``) until measured on a GPU: the kernels are tested on the CPU by
Triton's interpreter against the reference path, but no GPU was lent since they were written.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._eval_plan import _GATES

__all__ = ["ENV", "triton_available", "triton_site"]

ENV = "AN_SEARCH_TRITON"  # "1": eager CUDA sites take the Triton kernels
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS = {"meanstd": 0, "avg": 1}
_MAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_B, _MAX_K = 256, 64
_FLAT_BLOCK = 1024
_CL_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
_CL_TILE = (64, 32)  # positions x channels a step of the channels-last row kernels
_state: dict[str, ModuleType | None] = {}


def triton_available() -> bool:
    """Triton imports (its kernels are compiled on first use)."""
    return _kernels() is not None


def _kernels() -> ModuleType | None:
    if "k" not in _state:
        try:
            _state["k"] = importlib.import_module("an_search.layers._triton_kernels")
        except ImportError:
            _state["k"] = None
    return _state["k"]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class _Site:
    """What one call needs besides the tensors: modules, flags and block sizes."""

    an: nn.Module
    bn: nn.Module  # inner BatchNorm
    hn: nn.Module | None  # head norm: BatchNorm1d or GroupNorm(1, K)
    gate: int
    use_running: bool  # normalise with the running statistics
    update: bool  # training with running statistics: update them
    head_norm: int  # 0 none, 1 batch statistics, 2 running statistics, 3 GroupNorm(1, K)
    head_update: bool
    blocks: tuple[int, int, int]  # BLOCK_B, BLOCK_C, BLOCK_K
    n: int
    cl: bool  # channels-last memory format: (B, N, C) in memory


def _site(an: nn.Module, x: torch.Tensor, block_c: int | None) -> _Site | None:
    """The call's description, or None where the kernels do not apply."""
    bn = an._modules["norm"]
    if type(bn) not in _BN_TYPES or bn.affine or an.pool_name not in _POOLS:
        return None
    mods = list(an.attn.head.children())
    fc, gate_mod = mods[0], mods[-1]
    hn = mods[1] if len(mods) == 3 else None
    gate = _GATES.get(type(gate_mod))
    if type(fc) is not nn.Linear or gate is None or len(mods) not in (2, 3):
        return None
    if gate == 2 and gate_mod.dim not in (1, -1):
        return None
    group = type(hn) is nn.GroupNorm and hn.num_groups == 1
    if hn is not None and not ((type(hn) is nn.BatchNorm1d or group) and hn.affine):
        return None
    if x.dtype not in _MAP_DTYPES or x.dim() < 2 or x.numel() == 0:
        return None
    fmt = _CL_FORMATS.get(x.dim())
    cl = fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
    if not cl and not x.is_contiguous():
        return None
    params = [an.weight, an.bias, fc.weight, fc.bias, *([] if hn is None else [hn.weight, hn.bias])]
    if any(p is not None and p.dtype != torch.float32 for p in params):
        return None
    b, c, k = x.shape[0], x.shape[1], an.weight.shape[0]
    n = x.numel() // (b * c)
    if b > _MAX_B or k > _MAX_K or c != an.weight.shape[1]:
        return None
    use_running = not an.training and bn.running_mean is not None
    update = an.training and bn.running_mean is not None
    head_norm, head_update = 0, False
    if group:
        head_norm = 3
    elif hn is not None:
        head_norm = 1 if hn.training or hn.running_mean is None else 2
        head_update = hn.training and hn.running_mean is not None
        if head_norm == 1 and b < 2:
            return None  # BatchNorm1d raises its own error
    if not use_running and b * n < 2:
        return None
    bb, bk = max(16, _pow2(b)), max(16, _pow2(k))
    bc = block_c or max(16, min(128, 4096 // bb))
    blocks = (bb, bc, bk)
    return _Site(an, bn, hn, gate, use_running, update, head_norm, head_update, blocks, n, cl)


def _row_tile(n: int) -> tuple[int, int]:
    """(rows per program, positions per step) of the row kernels: about 4096 values a step."""
    block_n = min(1024, max(16, _pow2(n)))
    return max(1, min(64, 4096 // block_n)), block_n


def _forward(s: _Site, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    kern = _kernels()
    an, bn, hn = s.an, s.bn, s.hn
    fc = an.attn.head.fc
    b, c, k, n = x.shape[0], x.shape[1], an.weight.shape[0], s.n
    bb, bc, bk = s.blocks
    nblk = -(-c // bc)
    f32 = {"device": x.device, "dtype": torch.float32}
    m, v = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    if s.cl:
        grid = (b, -(-c // _CL_TILE[1]))
        kern.moments_cl_kernel[grid](x, m, v, b, c, n, BLOCK_N=_CL_TILE[0], BLOCK_C=_CL_TILE[1])
    else:
        rows, block_n = _row_tile(n)
        kern.moments_kernel[(-(-b * c // rows),)](x, m, v, b * c, n, R=rows, BLOCK_N=block_n)
    part = torch.empty(nblk, bb, bk, **f32)
    mean, r = torch.empty(c, **f32), torch.empty(c, **f32)
    count = b * n
    kern.channels_kernel[(nblk,)](
        m, v, fc.weight, part, mean, r,
        bn.running_mean if bn.running_mean is not None else mean,
        bn.running_var if bn.running_var is not None else r,
        bn.num_batches_tracked if bn.num_batches_tracked is not None else m,
        b, c, k, n, bn.eps, bn.momentum or 0.0, n / max(n - 1, 1),
        getattr(an.attn.pool, "eps", 0.0), count / max(count - 1, 1),
        USE_RUNNING=s.use_running, UPDATE=s.update,
        CUMULATIVE=bn.momentum is None and bn.num_batches_tracked is not None,
        POOL=_POOLS[an.pool_name], BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
    )  # fmt: skip
    lam, z, hhat = (torch.empty(bb, bk, **f32) for _ in range(3))
    hr = torch.empty(bk + bb, **f32)  # the head norm's 1/std: per logit, or per sample (GN)
    hn_ = hn if hn is not None else bn  # placeholders where there is no head norm
    h_nbt = hn_.num_batches_tracked if hn is not None and s.head_update else part
    kern.head_kernel[(1,)](
        part, nblk, fc.bias if fc.bias is not None else part,
        hn.weight if hn is not None else part, hn.bias if hn is not None else part,
        hn.running_mean if s.head_update or s.head_norm == 2 else part,
        hn.running_var if s.head_update or s.head_norm == 2 else part, h_nbt,
        bn.num_batches_tracked if s.update and bn.num_batches_tracked is not None else part,
        lam, z, hhat, hr, b, k, hn_.eps, getattr(hn, "momentum", None) or 0.0,
        b / max(b - 1, 1), HAS_BIAS=fc.bias is not None, NORM=s.head_norm,
        H_UPDATE=s.head_update, H_CUMULATIVE=s.head_update and hn.momentum is None,
        SITE_COUNT=s.update and bn.num_batches_tracked is not None, GATE=s.gate,
        BLOCK_B=bb, BLOCK_K=bk,
    )  # fmt: skip
    scale, shift = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    kern.mix_kernel[(nblk,)](
        lam, an.weight, an.bias, mean, r, scale, shift, b, c, k,
        BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
    )  # fmt: skip
    y = torch.empty_like(x)
    total = x.numel()
    grid = (-(-total // _FLAT_BLOCK),)
    kern.affine_kernel[grid](x, y, scale, shift, total, n, c, CL=s.cl, BLOCK=_FLAT_BLOCK)
    return y, (m, v, mean, r, lam, z, hhat, hr, scale)


def _backward(s: _Site, saved: tuple[torch.Tensor | None, ...], g: torch.Tensor) -> tuple:
    """Gradients of (x, head weight, head bias, head-norm weight and bias, Gamma, Beta)."""
    kern = _kernels()
    x, w, hbias, gnw, wm, bm, m, v, mean, r, lam, z, hhat, hr, scale = saved
    b, c, k, n = x.shape[0], x.shape[1], wm.shape[0], s.n
    bb, bc, bk = s.blocks
    nblk = -(-c // bc)
    f32 = {"device": x.device, "dtype": torch.float32}
    g = g.contiguous(memory_format=_CL_FORMATS[x.dim()] if s.cl else torch.contiguous_format)
    ga, gt = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    if s.cl:
        grid = (b, -(-c // _CL_TILE[1]))
        bn_, bc_ = _CL_TILE
        kern.rowdots_cl_kernel[grid](g, x, ga, gt, b, c, n, BLOCK_N=bn_, BLOCK_C=bc_)
    else:
        rows, block_n = _row_tile(n)
        kern.rowdots_kernel[(-(-b * c // rows),)](g, x, ga, gt, b * c, n, R=rows, BLOCK_N=block_n)
    gwm, gbm = torch.empty(k, c, **f32), torch.empty(k, c, **f32)
    part = torch.empty(nblk, bb, bk, **f32)
    gm, gv = torch.empty(b, c, **f32), torch.empty(b, c, **f32)
    kern.tail_bwd_kernel[(nblk,)](
        ga, gt, lam, wm, bm, m, mean, r, scale, gwm, gbm, part, gm, gv, b, c, k,
        BATCH_STATS=not s.use_running, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
    )  # fmt: skip
    gh = torch.empty(bb, bk, **f32)
    ggw, ggb, gbias = (torch.empty(bk, **f32) for _ in range(3))
    kern.head_bwd_kernel[(1,)](
        part, nblk, lam, z, hhat, hr, gnw if gnw is not None else part, gh, ggw, ggb,
        gbias, b, k, NORM=s.head_norm, GATE=s.gate, HAS_BIAS=hbias is not None,
        BLOCK_B=bb, BLOCK_K=bk,
    )  # fmt: skip
    gw = torch.empty(k, c, **f32)
    kern.pool_bwd_kernel[(nblk,)](
        gh, w, m, v, gm, gv, gw, b, c, k, n, n / max(n - 1, 1),
        getattr(s.an.attn.pool, "eps", 0.0), POOL=_POOLS[s.an.pool_name],
        BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk,
    )  # fmt: skip
    dx = torch.empty_like(x)
    total = x.numel()
    grid = (-(-total // _FLAT_BLOCK),)
    kern.dx_kernel[grid](g, x, scale, gv, gm, dx, total, n, c, CL=s.cl, BLOCK=_FLAT_BLOCK)
    has_bias, has_norm = hbias is not None, gnw is not None
    return (
        dx, gw, gbias[:k] if has_bias else None, ggw[:k] if has_norm else None,
        ggb[:k] if has_norm else None, gwm, gbm,
    )  # fmt: skip


class _TritonSite(torch.autograd.Function):
    """(x, head weight, head bias, head-norm weight, head-norm bias, Gamma, Beta) -> y."""

    @staticmethod
    def forward(ctx, s: _Site, x, w, hbias, gw, gb, wm, bm):  # type: ignore[override]
        y, saved = _forward(s, x)
        ctx.save_for_backward(x, w, hbias, gw, wm, bm, *saved)  # (in-place edits: caught)
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
    s = _site(an, x, block_c)
    if s is None:
        return None
    fc, hn = an.attn.head.fc, s.hn
    params = (fc.weight, fc.bias, None if hn is None else hn.weight,
              None if hn is None else hn.bias, an.weight, an.bias)  # fmt: skip
    tracked = [t for t in (x, *params) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _TritonSite.apply(s, x, *params)
    return _forward(s, x)[0]


def triton_requested() -> bool:
    """``AN_SEARCH_TRITON=1`` is set."""
    return os.environ.get(ENV) == "1"
