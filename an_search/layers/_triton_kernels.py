"""Triton kernels of a BatchNorm-based AttentiveNorm site on a GPU (driven by ``_triton_site.py``).

A site in five launches forward and five backward, instead of the ~30 small ATen ops and
autograd nodes of the eager GPU path (which is bound by launches, not by memory traffic):

    forward:  moments -> channels -> head -> mix -> affine
    backward: rowdots -> tail_bwd -> head_bwd -> pool_bwd -> dx

(the two head kernels are in ``_triton_head.py``).
Feature-map kernels (``moments``, ``affine``, ``rowdots``, ``dx``) see x as B*C rows of N
positions (for channels-last maps, (B, N, C) in memory, ``moments_cl`` and ``rowdots_cl`` take
one sample and a block of channels a program, and the flat kernels find each value's row). The
(B, C)-level kernels (``channels``, ``mix``, ``tail_bwd``, ``pool_bwd``) hold the whole batch
of one block of channels, so that the batch statistics and the mixtures' gradients need no
cross-program reduction; the two sums over channels (the head's logits and the gradient of
lambda) are written per block and summed by the single-program ``head`` and ``head_bwd``.
Everything accumulates in float32; feature maps may be float32, float16 or bfloat16.

Formulas (the CPU kernels' ``_native_bc.c`` and ``_norm_stats.py``): per-sample moments
``m``, ``v`` give the pooled statistic and the batch statistics ``mean = E_b[m]``,
``var = E_b[v] + Var_b[m]``; ``scale = (lam @ Wm) * rsqrt(var + eps)``,
``shift = lam @ Bm - scale * mean``; ``y = x * scale + shift``. Backward:
``dx = g * scale + cc * x + dd`` with ``cc = 2 g_v / N`` (0 where N = 1) and
``dd = g_m / N - cc * m``.

Testable without a GPU: with ``TRITON_INTERPRET=1`` set before this module is imported, the
kernels run on CPU tensors (``tests/layers/test_triton_site.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ruff: noqa: N803 (Triton's constexpr block sizes are upper case by convention)
# Sizes that change from site to site are not specialised (do_not_specialize): one compiled
# kernel serves every site of a network; N stays specialised in the row kernels, whose loads
# vectorise where rows start on 16-value boundaries.


@triton.jit(do_not_specialize=["n_rows"])
def moments_kernel(
    x_ptr, m_ptr, v_ptr, mx_ptr, cnt_ptr, n_rows, N, MAX: tl.constexpr, R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Per-row mean and biased variance, one pass shifted by the row's first value; with MAX
    also the row's maximum and how many values equal it (``amax`` shares its gradient)."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < n_rows
    base = rows.to(tl.int64) * N
    shift = tl.load(x_ptr + base, mask=rmask, other=0.0).to(tl.float32)
    s1, s2, lm, lc = _moment_init(R, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols[None, :] < N)
        xv = tl.load(x_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s1, s2, lm, lc = _moment_step(xv, mask, shift[:, None], s1, s2, lm, lc, MAX)
    _moment_store(s1, s2, lm, lc, shift, N, rows, rmask, m_ptr, v_ptr, mx_ptr, cnt_ptr, 1, MAX)


@triton.jit
def _moment_init(D0: tl.constexpr, D1: tl.constexpr):
    """Zero sums, -inf maxima and zero counts, (D0, D1) lanes each."""
    zero = tl.zeros((D0, D1), tl.float32)
    return zero, zero, tl.full((D0, D1), float("-inf"), tl.float32), zero


@triton.jit
def _moment_step(xv, mask, shift, s1, s2, lm, lc, MAX: tl.constexpr):
    """One tile into the shifted sums ``s1``, ``s2`` and (MAX) the running per-lane maximum
    ``lm`` with the count ``lc`` of values equal to it."""
    d = tl.where(mask, xv - shift, 0.0)
    s1 += d
    s2 += d * d
    if MAX:
        xm = tl.where(mask, xv, float("-inf"))
        lc = tl.where(xm > lm, 1.0, tl.where(xm == lm, lc + 1.0, lc))
        lm = tl.maximum(lm, xm)
    return s1, s2, lm, lc


@triton.jit
def _moment_store(
    s1, s2, lm, lc, shift, N, out, omask, m_ptr, v_ptr, mx_ptr, cnt_ptr, AXIS: tl.constexpr,
    MAX: tl.constexpr,
):  # fmt: skip
    """Reduce the lanes along AXIS: mean, biased variance and (MAX) maximum and its count."""
    t1 = tl.sum(s1, AXIS) / N
    t2 = tl.sum(s2, AXIS) / N
    tl.store(m_ptr + out, shift + t1, mask=omask)
    tl.store(v_ptr + out, tl.maximum(t2 - t1 * t1, 0.0), mask=omask)
    if MAX:
        mx = tl.max(lm, AXIS)
        ties = tl.where(lm == tl.expand_dims(mx, AXIS), lc, 0.0)
        tl.store(mx_ptr + out, mx, mask=omask)
        tl.store(cnt_ptr + out, tl.sum(ties, AXIS), mask=omask)


@triton.jit
def _bc_block(pid, B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Indices of block ``pid`` of channels: samples, channels, mixtures, the channel mask, the
    (sample, channel) mask and the offsets into a (B, C) array."""
    b = tl.arange(0, BLOCK_B)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mask = (b < B)[:, None] & cm[None, :]
    return b, c, tl.arange(0, BLOCK_K), cm, mask, b[:, None] * C + c[None, :]


@triton.jit
def lerp_running(rm_ptr, rv_ptr, idx, mask, mean, var, f, unbias):
    """Running statistics as ``nn.BatchNorm``: ``r += f * (batch - r)``, variance unbiased."""
    rm = tl.load(rm_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(rm_ptr + idx, rm + f * (mean - rm), mask=mask)
    tl.store(rv_ptr + idx, rv + f * (var * unbias - rv), mask=mask)


@triton.jit
def _pooled(m, v, mx, bessel, pool_eps, POOL: tl.constexpr):
    out = m  # avg
    if POOL == 0:  # meanstd: mean / sqrt(unbiased var + eps)
        out = m * tl.rsqrt(v * bessel + pool_eps)
    elif POOL == 2:  # avgmax: (mean + max) / 2
        out = 0.5 * (m + mx)
    return out  # (one return: the Triton compiler's rule for jit helpers)


@triton.jit(do_not_specialize=["B", "C", "K", "N"])
def channels_kernel(
    m_ptr, v_ptr, mx_ptr, w_ptr, part_ptr, mean_ptr, r_ptr, rm_ptr, rv_ptr, nbt_ptr,
    B, C, K, N, eps, momentum, bessel, pool_eps, unbias,
    USE_RUNNING: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
    POOL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One block of channels: normalisation statistics (and the running-stat update), and this
    block's share of the head's logits ``pooled @ W.T``."""
    pid = tl.program_id(0)
    b, c, k, cm, mask, off = _bc_block(pid, B, C, BLOCK_B, BLOCK_C, BLOCK_K)
    m = tl.load(m_ptr + off, mask=mask, other=0.0)
    v = tl.load(v_ptr + off, mask=mask, other=0.0)
    if USE_RUNNING:
        mean = tl.load(rm_ptr + c, mask=cm, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + c, mask=cm, other=1.0).to(tl.float32)
    else:
        mean = tl.sum(m, 0) / B
        d = tl.where(mask, m - mean[None, :], 0.0)
        var = (tl.sum(v, 0) + tl.sum(d * d, 0)) / B
        if UPDATE:
            if CUMULATIVE:  # momentum None: 1 / (batches so far, this one included)
                f = 1.0 / (tl.load(nbt_ptr).to(tl.float32) + 1.0)
            else:
                f = momentum
            lerp_running(rm_ptr, rv_ptr, c, cm, mean, var, f, unbias)
    tl.store(mean_ptr + c, mean, mask=cm)
    tl.store(r_ptr + c, tl.rsqrt(var + eps), mask=cm)
    mx = m
    if POOL == 2:
        mx = tl.load(mx_ptr + off, mask=mask, other=0.0)
    pooled = tl.where(mask, _pooled(m, v, mx, bessel, pool_eps, POOL), 0.0)
    wmask = cm[:, None] & (k < K)[None, :]
    w = tl.load(w_ptr + k[None, :] * C + c[:, None], mask=wmask, other=0.0).to(tl.float32)
    part = tl.dot(pooled, w, input_precision="ieee")  # (BLOCK_B, BLOCK_K)
    tl.store(part_ptr + pid * BLOCK_B * BLOCK_K + b[:, None] * BLOCK_K + k[None, :], part)


@triton.jit
def _kc(ptr, c, C, K, BLOCK_K: tl.constexpr):
    """The (BLOCK_K, BLOCK_C) block of a (K, C) matrix, zero padded, as float32."""
    k = tl.arange(0, BLOCK_K)
    mask = (k < K)[:, None] & (c < C)[None, :]
    return tl.load(ptr + k[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["B", "C", "K"])
def mix_kernel(
    lam_ptr, wm_ptr, bm_ptr, mean_ptr, r_ptr, scale_ptr, shift_ptr, B, C, K,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Per-sample ``scale = (lam @ Wm) * r`` and ``shift = lam @ Bm - scale * mean``."""
    b, c, k, cm, mask, off = _bc_block(tl.program_id(0), B, C, BLOCK_B, BLOCK_C, BLOCK_K)
    lam = tl.load(lam_ptr + b[:, None] * BLOCK_K + k[None, :])
    gamma = tl.dot(lam, _kc(wm_ptr, c, C, K, BLOCK_K), input_precision="ieee")
    beta = tl.dot(lam, _kc(bm_ptr, c, C, K, BLOCK_K), input_precision="ieee")
    r = tl.load(r_ptr + c, mask=cm, other=0.0)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    scale = gamma * r[None, :]
    tl.store(scale_ptr + off, scale, mask=mask)
    tl.store(shift_ptr + off, beta - scale * mean[None, :], mask=mask)


@triton.jit
def _row_of(idx, N, C, CL: tl.constexpr):
    """The (sample, channel) row of flat index ``idx``: (B, C, N) order, or (B, N, C) (CL)."""
    if CL:
        row = (idx // (N * C)) * C + idx % C
    else:
        row = idx // N
    return row


@triton.jit(do_not_specialize=["total", "N", "C"])
def affine_kernel(x_ptr, y_ptr, a_ptr, t_ptr, total, N, C, CL: tl.constexpr, BLOCK: tl.constexpr):
    """``y = x * a[row] + t[row]`` over the flat (B*C*N) map."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    row = _row_of(idx, N, C, CL)
    xv = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row, mask=mask, other=0.0)
    t = tl.load(t_ptr + row, mask=mask, other=0.0)
    tl.store(y_ptr + idx, xv * a + t, mask=mask)


@triton.jit(do_not_specialize=["B", "C"])
def moments_cl_kernel(
    x_ptr, m_ptr, v_ptr, mx_ptr, cnt_ptr, B, C, N, MAX: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``moments_kernel`` for channels-last maps (B, N, C): one sample, a block of channels."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    base = b * N * C
    shift = tl.load(x_ptr + base + c, mask=cm, other=0.0).to(tl.float32)
    s1, s2, lm, lc = _moment_init(BLOCK_N, BLOCK_C)
    for start in range(0, N, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        mask = (pos < N)[:, None] & cm[None, :]
        xv = tl.load(x_ptr + base + pos[:, None] * C + c[None, :], mask=mask, other=0.0)
        s1, s2, lm, lc = _moment_step(xv.to(tl.float32), mask, shift[None, :], s1, s2, lm, lc, MAX)
    out = b * C + c
    _moment_store(s1, s2, lm, lc, shift, N, out, cm, m_ptr, v_ptr, mx_ptr, cnt_ptr, 0, MAX)


@triton.jit(do_not_specialize=["B", "C"])
def rowdots_cl_kernel(
    g_ptr, x_ptr, ga_ptr, gt_ptr, B, C, N, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    """``rowdots_kernel`` for channels-last maps."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    base = b * N * C
    s1 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    s2 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for start in range(0, N, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        mask = (pos < N)[:, None] & cm[None, :]
        off = base + pos[:, None] * C + c[None, :]
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s1 += g * tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s2 += g
    tl.store(ga_ptr + b * C + c, tl.sum(s1, 0), mask=cm)
    tl.store(gt_ptr + b * C + c, tl.sum(s2, 0), mask=cm)


@triton.jit(do_not_specialize=["n_rows"])
def rowdots_kernel(g_ptr, x_ptr, ga_ptr, gt_ptr, n_rows, N, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row: ``sum(g * x)`` (gradient of the scale) and ``sum(g)`` (of the shift)."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < n_rows
    base = rows.to(tl.int64) * N
    s1 = tl.zeros((R, BLOCK_N), tl.float32)
    s2 = tl.zeros((R, BLOCK_N), tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols[None, :] < N)
        off = base[:, None] + cols[None, :]
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s1 += g * tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s2 += g
    tl.store(ga_ptr + rows, tl.sum(s1, 1), mask=rmask)
    tl.store(gt_ptr + rows, tl.sum(s2, 1), mask=rmask)


@triton.jit(do_not_specialize=["B", "C", "K"])
def tail_bwd_kernel(
    ga_ptr, gt_ptr, lam_ptr, wm_ptr, bm_ptr, m_ptr, mean_ptr, r_ptr, scale_ptr,
    gwm_ptr, gbm_ptr, part_ptr, gm_ptr, gv_ptr, B, C, K,
    BATCH_STATS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Backward of the mixtures and the batch statistics for one block of channels: the
    mixtures' gradients (whole), this block's share of the gradient of lambda, and the
    gradients of the moments through the batch statistics."""
    pid = tl.program_id(0)
    b, c, k, cm, mask, off = _bc_block(pid, B, C, BLOCK_B, BLOCK_C, BLOCK_K)
    ga = tl.load(ga_ptr + off, mask=mask, other=0.0)
    gt = tl.load(gt_ptr + off, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + off, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    r = tl.load(r_ptr + c, mask=cm, other=1.0)
    g_s = ga - gt * mean[None, :]  # total d/d scale
    g_gamma = g_s * r[None, :]
    lam = tl.load(lam_ptr + b[:, None] * BLOCK_K + k[None, :])
    lam_t = tl.trans(lam)
    kmask = (k < K)[:, None] & cm[None, :]
    koff = k[:, None] * C + c[None, :]
    gwm = tl.dot(lam_t, g_gamma, input_precision="ieee")
    tl.store(gwm_ptr + koff, gwm, mask=kmask)
    tl.store(gbm_ptr + koff, tl.dot(lam_t, gt, input_precision="ieee"), mask=kmask)
    wm = _kc(wm_ptr, c, C, K, BLOCK_K)
    bm = _kc(bm_ptr, c, C, K, BLOCK_K)
    part = tl.dot(g_gamma, tl.trans(wm), input_precision="ieee")
    part += tl.dot(gt, tl.trans(bm), input_precision="ieee")
    tl.store(part_ptr + pid * BLOCK_B * BLOCK_K + b[:, None] * BLOCK_K + k[None, :], part)
    if BATCH_STATS:
        m = tl.load(m_ptr + off, mask=mask, other=0.0)
        gamma = scale / r[None, :]
        g_var = -0.5 * tl.sum(g_s * gamma, 0) * r * r * r
        g_mean = -tl.sum(gt * scale, 0)
        gm = g_mean[None, :] / B + (m - mean[None, :]) * (g_var * (2.0 / B))[None, :]
        gv = tl.zeros((BLOCK_B, BLOCK_C), tl.float32) + (g_var / B)[None, :]
    else:  # running statistics: the moments reach the output through the head only
        gm = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
        gv = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    tl.store(gm_ptr + off, gm, mask=mask)
    tl.store(gv_ptr + off, gv, mask=mask)


@triton.jit(do_not_specialize=["B", "C", "K", "N"])
def pool_bwd_kernel(
    gh_ptr, w_ptr, m_ptr, v_ptr, mx_ptr, cnt_ptr, gm_ptr, gv_ptr, gmx_ptr, gw_ptr,
    B, C, K, N, bessel, pool_eps,
    POOL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The head's weight gradient and the pool's backward for one block of channels; turns
    ``g_m``, ``g_v`` (in place) into the coefficients ``cc``, ``dd`` of ``dx``."""
    b, c, k, cm, mask, off = _bc_block(tl.program_id(0), B, C, BLOCK_B, BLOCK_C, BLOCK_K)
    gh = tl.load(gh_ptr + b[:, None] * BLOCK_K + k[None, :])
    gp = tl.dot(gh, _kc(w_ptr, c, C, K, BLOCK_K), input_precision="ieee")  # d pooled
    m = tl.load(m_ptr + off, mask=mask, other=0.0)
    v = tl.load(v_ptr + off, mask=mask, other=0.0)
    gm = tl.load(gm_ptr + off, mask=mask, other=0.0)
    gv = tl.load(gv_ptr + off, mask=mask, other=0.0)
    mx = m
    if POOL == 2:
        mx = tl.load(mx_ptr + off, mask=mask, other=0.0)
    pooled = tl.where(mask, _pooled(m, v, mx, bessel, pool_eps, POOL), 0.0)
    if POOL == 0:
        s = tl.rsqrt(v * bessel + pool_eps)
        gm += gp * s
        gv += gp * m * s * s * s * (-0.5 * bessel)
    elif POOL == 2:  # half to the mean, half shared by the positions at the maximum
        gm += 0.5 * gp
        cnt = tl.load(cnt_ptr + off, mask=mask, other=1.0)
        tl.store(gmx_ptr + off, 0.5 * gp / cnt, mask=mask)
    else:
        gm += gp
    gwh = tl.dot(tl.trans(gh), pooled, input_precision="ieee")
    tl.store(gw_ptr + k[:, None] * C + c[None, :], gwh, mask=(k < K)[:, None] & cm[None, :])
    cc = gv * tl.where(N > 1, 2.0 / N, 0.0)  # (N = 1: x = m, the variance's share is 0)
    tl.store(gm_ptr + off, gm / N - cc * m, mask=mask)  # dd
    tl.store(gv_ptr + off, cc, mask=mask)


@triton.jit(do_not_specialize=["total", "N", "C"])
def dx_kernel(
    g_ptr, x_ptr, a_ptr, cc_ptr, dd_ptr, mx_ptr, gmx_ptr, dx_ptr, total, N, C,
    CL: tl.constexpr, MAX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``dx = g * a[row] + cc[row] * x + dd[row]`` over the flat map, plus ``gmx[row]`` where
    ``x`` is its row's maximum (MAX: the avgmax pool)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    row = _row_of(idx, N, C, CL)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row, mask=mask, other=0.0)
    cc = tl.load(cc_ptr + row, mask=mask, other=0.0)
    dd = tl.load(dd_ptr + row, mask=mask, other=0.0)
    out = g * a + cc * xv + dd
    if MAX:
        peak = tl.load(mx_ptr + row, mask=mask, other=0.0)
        out += tl.where(xv == peak, tl.load(gmx_ptr + row, mask=mask, other=0.0), 0.0)
    tl.store(dx_ptr + idx, out, mask=mask)
