"""Triton kernels of AttentiveNorm's attention head, one program each (``_triton_site.py``).

The head sees the whole batch at once: its BatchNorm1d needs statistics over the batch, and
(B, 2K) or (B, K) is small. ``head_kernel`` sums the per-block logits written by
``channels_kernel`` (``_triton_kernels.py``) and runs one or two layers

    layer 1:  h1 = pooled @ W1.T (+ b1) -> norm1 -> [ReLU -> h2 = a1 @ W2.T (+ b2) -> norm2]
    gate:     hard-sigmoid (0), sigmoid (1) or softmax over K (2)

with each norm (NORM) 0 none, 1 BatchNorm1d with batch statistics (updating the running ones
and the counter if UPDATE), 2 BatchNorm1d with running statistics, 3 GroupNorm(1, width).
``head_bwd_kernel`` goes back from the per-block gradients of lambda to the gradient of h1,
which ``pool_bwd_kernel`` takes on to the pooled statistic and W1.

Each layer keeps a workspace for the backward: ``z`` (normalised and affine, before the ReLU or
the gate) and ``hhat`` as (BLOCK_B, BLOCK_W) arrays, then 1/std per unit (BLOCK_W) and per
sample (BLOCK_B, GroupNorm): :func:`workspace_size` values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_kernels import lerp_running

# ruff: noqa: N803 (Triton's constexpr block sizes are upper case by convention)


def workspace_size(block_b: int, block_w: int) -> int:
    """Values of one layer's workspace (see the module doc)."""
    return 2 * block_b * block_w + block_w + block_b


@triton.jit
def _block_sum(part_ptr, nblk, BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
    """Sum of ``nblk`` zero-padded (BLOCK_B, BLOCK_W) partial arrays."""
    off = tl.arange(0, BLOCK_B)[:, None] * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_W), tl.float32)
    for i in range(nblk):
        acc += tl.load(part_ptr + i * BLOCK_B * BLOCK_W + off)
    return acc


@triton.jit
def _norm_fwd(
    h, B, W, w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr, ws_ptr, eps, momentum, unbias,
    NORM: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """One layer's norm over (B, W) logits ``h``; returns ``z`` and fills the workspace."""
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, BLOCK_W)
    jm = j < W
    mask = (b < B)[:, None] & jm[None, :]
    r = tl.full((BLOCK_W,), 1.0, tl.float32)
    if NORM == 1:
        mean = tl.sum(tl.where(mask, h, 0.0), 0) / B
        d = tl.where(mask, h - mean[None, :], 0.0)
        var = tl.sum(d * d, 0) / B
        r = tl.rsqrt(var + eps)
        hhat = d * r[None, :]
        if UPDATE:
            nbt = tl.load(nbt_ptr)
            tl.store(nbt_ptr, nbt + 1)
            if CUMULATIVE:
                f = 1.0 / (nbt.to(tl.float32) + 1.0)
            else:
                f = momentum
            lerp_running(rm_ptr, rv_ptr, j, jm, mean, var, f, unbias)
    elif NORM == 2:
        rm = tl.load(rm_ptr + j, mask=jm, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.load(rv_ptr + j, mask=jm, other=1.0).to(tl.float32) + eps)
        hhat = tl.where(mask, (h - rm[None, :]) * r[None, :], 0.0)
    elif NORM == 3:  # GroupNorm(1, W): each sample over its W units
        mean = tl.sum(tl.where(mask, h, 0.0), 1) / W
        d = tl.where(mask, h - mean[:, None], 0.0)
        rs = tl.rsqrt(tl.sum(d * d, 1) / W + eps)
        hhat = d * rs[:, None]
        tl.store(ws_ptr + 2 * BLOCK_B * BLOCK_W + BLOCK_W + b, rs)
    else:
        hhat = h
    if NORM != 0:
        gw = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
        gb = tl.load(b_ptr + j, mask=jm, other=0.0).to(tl.float32)
        z = hhat * gw[None, :] + gb[None, :]
    else:
        z = h
    off = b[:, None] * BLOCK_W + j[None, :]
    tl.store(ws_ptr + off, z)
    tl.store(ws_ptr + BLOCK_B * BLOCK_W + off, hhat)
    tl.store(ws_ptr + 2 * BLOCK_B * BLOCK_W + j, r)
    return z


@triton.jit
def _norm_bwd(
    gz, B, W, ws_ptr, w_ptr, ggw_ptr, ggb_ptr, NORM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Backward of :func:`_norm_fwd`: the gradient of the logits; writes the norm's weight and
    bias gradients."""
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, BLOCK_W)
    jm = j < W
    mask = (b < B)[:, None] & jm[None, :]
    g_h = tl.where(mask, gz, 0.0)
    if NORM != 0:
        gz = g_h
        off = b[:, None] * BLOCK_W + j[None, :]
        hhat = tl.load(ws_ptr + BLOCK_B * BLOCK_W + off)
        r = tl.load(ws_ptr + 2 * BLOCK_B * BLOCK_W + j)
        gw = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
        sg = tl.sum(gz, 0)
        sgh = tl.sum(gz * hhat, 0)
        tl.store(ggw_ptr + j, sgh, mask=jm)
        tl.store(ggb_ptr + j, sg, mask=jm)
        if NORM == 1:
            g_h = (gw * r / B)[None, :] * (B * gz - sg[None, :] - hhat * sgh[None, :])
        elif NORM == 3:  # per sample over W: the same formula along the other axis
            gzw = gz * gw[None, :]
            rs = tl.load(ws_ptr + 2 * BLOCK_B * BLOCK_W + BLOCK_W + b)
            s1 = tl.sum(gzw, 1)
            s2 = tl.sum(gzw * hhat, 1)
            g_h = (rs / W)[:, None] * (W * gzw - s1[:, None] - hhat * s2[:, None])
        else:
            g_h = gz * (gw * r)[None, :]
        g_h = tl.where(mask, g_h, 0.0)
    return g_h  # (one return: the Triton compiler's rule for jit helpers)


@triton.jit
def _w2_block(w2_ptr, H, K, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """W2 (K, H) as a zero-padded (BLOCK_K, BLOCK_H) block."""
    k = tl.arange(0, BLOCK_K)
    j = tl.arange(0, BLOCK_H)
    mask = (k < K)[:, None] & (j < H)[None, :]
    return tl.load(w2_ptr + k[:, None] * H + j[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["nblk", "B", "H", "K"])
def head_kernel(
    part_ptr, nblk, b1_ptr, n1w_ptr, n1b_ptr, n1rm_ptr, n1rv_ptr, n1nbt_ptr, ws1_ptr,
    w2_ptr, b2_ptr, n2w_ptr, n2b_ptr, n2rm_ptr, n2rv_ptr, n2nbt_ptr, ws2_ptr, snbt_ptr,
    lam_ptr, B, H, K, eps1, mom1, eps2, mom2, unbias,
    LAYERS: tl.constexpr, BIAS1: tl.constexpr, NORM1: tl.constexpr, UPD1: tl.constexpr,
    CUM1: tl.constexpr, BIAS2: tl.constexpr, NORM2: tl.constexpr, UPD2: tl.constexpr,
    CUM2: tl.constexpr, SITE_COUNT: tl.constexpr, GATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The head forward (see the module doc); H is layer 1's width (K for one layer, where
    BLOCK_H == BLOCK_K). Also counts the batch in the site's ``num_batches_tracked`` (after
    ``channels_kernel`` read it for a cumulative average)."""
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, BLOCK_H)
    h = _block_sum(part_ptr, nblk, BLOCK_B, BLOCK_H)
    if BIAS1:
        h += tl.load(b1_ptr + j, mask=j < H, other=0.0).to(tl.float32)[None, :]
    z = _norm_fwd(
        h, B, H, n1w_ptr, n1b_ptr, n1rm_ptr, n1rv_ptr, n1nbt_ptr, ws1_ptr, eps1, mom1, unbias,
        NORM1, UPD1, CUM1, BLOCK_B, BLOCK_H,
    )  # fmt: skip
    k = tl.arange(0, BLOCK_K)
    km = k < K
    if LAYERS == 2:
        a1 = tl.where((b < B)[:, None] & (j < H)[None, :], tl.maximum(z, 0.0), 0.0)
        h2 = tl.dot(a1, tl.trans(_w2_block(w2_ptr, H, K, BLOCK_H, BLOCK_K)), input_precision="ieee")
        if BIAS2:
            h2 += tl.load(b2_ptr + k, mask=km, other=0.0).to(tl.float32)[None, :]
        z = _norm_fwd(
            h2, B, K, n2w_ptr, n2b_ptr, n2rm_ptr, n2rv_ptr, n2nbt_ptr, ws2_ptr, eps2, mom2,
            unbias, NORM2, UPD2, CUM2, BLOCK_B, BLOCK_K,
        )  # fmt: skip
    if GATE == 0:
        lam = tl.minimum(tl.maximum(z / 6.0 + 0.5, 0.0), 1.0)
    elif GATE == 1:
        lam = tl.sigmoid(z)
    else:
        zz = tl.where(km[None, :], z, float("-inf"))
        e = tl.exp(zz - tl.max(zz, 1)[:, None])
        lam = e / tl.sum(e, 1)[:, None]
    lam = tl.where((b < B)[:, None] & km[None, :], lam, 0.0)
    if SITE_COUNT:
        tl.store(snbt_ptr, tl.load(snbt_ptr) + 1)
    tl.store(lam_ptr + b[:, None] * BLOCK_K + k[None, :], lam)


@triton.jit(do_not_specialize=["nblk", "B", "H", "K"])
def head_bwd_kernel(
    part_ptr, nblk, lam_ptr, ws1_ptr, n1w_ptr, g_n1w_ptr, g_n1b_ptr, g_b1_ptr,
    ws2_ptr, w2_ptr, n2w_ptr, g_n2w_ptr, g_n2b_ptr, g_b2_ptr, g_w2_ptr, gh1_ptr, B, H, K,
    LAYERS: tl.constexpr, BIAS1: tl.constexpr, NORM1: tl.constexpr, BIAS2: tl.constexpr,
    NORM2: tl.constexpr, GATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The head backward: from the per-block gradients of lambda to the gradient of h1, with
    the gradients of the biases, the norms and W2 on the way."""
    b = tl.arange(0, BLOCK_B)
    j = tl.arange(0, BLOCK_H)
    k = tl.arange(0, BLOCK_K)
    off = b[:, None] * BLOCK_K + k[None, :]
    g_lam = _block_sum(part_ptr, nblk, BLOCK_B, BLOCK_K)
    lam = tl.load(lam_ptr + off)
    if LAYERS == 2:
        z = tl.load(ws2_ptr + off)
    else:
        z = tl.load(ws1_ptr + off)
    if GATE == 0:  # hard-sigmoid: slope 1/6 strictly inside (-3, 3), as ATen
        gz = tl.where((z > -3.0) & (z < 3.0), g_lam / 6.0, 0.0)
    elif GATE == 1:
        gz = g_lam * lam * (1.0 - lam)
    else:
        gz = lam * (g_lam - tl.sum(g_lam * lam, 1)[:, None])
    if LAYERS == 2:
        g_h2 = _norm_bwd(gz, B, K, ws2_ptr, n2w_ptr, g_n2w_ptr, g_n2b_ptr, NORM2, BLOCK_B, BLOCK_K)
        if BIAS2:
            tl.store(g_b2_ptr + k, tl.sum(g_h2, 0), mask=k < K)
        z1 = tl.load(ws1_ptr + b[:, None] * BLOCK_H + j[None, :])
        a1 = tl.where((b < B)[:, None] & (j < H)[None, :], tl.maximum(z1, 0.0), 0.0)
        g_w2 = tl.dot(tl.trans(g_h2), a1, input_precision="ieee")  # (BLOCK_K, BLOCK_H)
        w2mask = (k < K)[:, None] & (j < H)[None, :]
        tl.store(g_w2_ptr + k[:, None] * H + j[None, :], g_w2, mask=w2mask)
        w2 = _w2_block(w2_ptr, H, K, BLOCK_H, BLOCK_K)
        g_z1 = tl.where(z1 > 0.0, tl.dot(g_h2, w2, input_precision="ieee"), 0.0)  # ReLU
        g_h1 = _norm_bwd(
            g_z1, B, H, ws1_ptr, n1w_ptr, g_n1w_ptr, g_n1b_ptr, NORM1, BLOCK_B, BLOCK_H
        )
    else:
        g_h1 = _norm_bwd(gz, B, H, ws1_ptr, n1w_ptr, g_n1w_ptr, g_n1b_ptr, NORM1, BLOCK_B, BLOCK_H)
    if BIAS1:
        tl.store(g_b1_ptr + j, tl.sum(g_h1, 0), mask=j < H)
    tl.store(gh1_ptr + b[:, None] * BLOCK_H + j[None, :], g_h1)
