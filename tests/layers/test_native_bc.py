"""The (B, C)-level training kernels (``_native_bc.c``) against the same maths in plain torch
ops with autograd: the site's tail (mixtures + batch statistics), the meanstd statistic and
the heads' Linear + BatchNorm1d pair, forward, backward and running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from an_search.layers import _native
from an_search.layers._head_train import linear_batchnorm
from an_search.layers._native_bc import native_meanstd, native_tail
from an_search.layers._norm_stats import _SiteTail
from an_search.layers.pooling import _MeanStd

pytestmark = pytest.mark.skipif(
    _native.library() is None, reason=f"native kernels: {_native.unavailable_reason()}"
)
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def _leaves(dtype: torch.dtype, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.randn(s, dtype=dtype).requires_grad_() for s in shapes]


def _tail_ref(lam, wm, bm, m, v, eps):  # noqa: ANN001, ANN202  (plain ops, written out)
    gamma, beta = lam @ wm, lam @ bm
    mean = m.mean(0)
    var = v.mean(0) + ((m - mean) ** 2).mean(0)  # law of total variance
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - scale * mean, mean, var


# The kernels' register tiles (4 rows x 2 vectors of channels in the products, 2 x 4 rows in
# the dot products) and their remainders: C not a multiple of the vector width, B odd, K
# under and over one tile.
SHAPES = [(6, 20, 3), (7, 37, 9), (9, 48, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upstream", ["both", "shift-only"])
@pytest.mark.parametrize("shape", SHAPES)
def test_site_tail_matches_plain_ops(
    dtype: torch.dtype, upstream: str, shape: tuple[int, int, int]
) -> None:
    b, c, k = shape
    lam, wm, bm, m = _leaves(dtype, (b, k), (k, c), (k, c), (b, c))
    v = (torch.rand(b, c, dtype=dtype) + 0.1).requires_grad_()
    assert native_tail(lam, wm, bm, m, v, 1e-5) is not None  # the C kernels run
    got = _SiteTail.apply(lam, wm, bm, m, v, 1e-5)
    want = _tail_ref(lam, wm, bm, m, v, 1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])
    g_scale, g_shift = torch.randn(2, b, c, dtype=dtype)
    ins = (lam, wm, bm, m, v)
    outs = (got[1],) if upstream == "shift-only" else got[:2]
    grads = (g_shift,) if upstream == "shift-only" else (g_scale, g_shift)
    ref_outs = (want[1],) if upstream == "shift-only" else want[:2]
    for g, w in zip(
        torch.autograd.grad(outs, ins, grads),
        torch.autograd.grad(ref_outs, ins, grads),
        strict=True,
    ):
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_site_tail_backward_under_a_dispatch_mode_uses_aten() -> None:
    """FlopCounterMode must see every op: the backward then runs the ATen formulas."""
    lam, wm, bm, m = _leaves(torch.float64, (4, 2), (2, 9), (2, 9), (4, 9))
    v = (torch.rand(4, 9, dtype=torch.float64) + 0.1).requires_grad_()
    scale, shift, _, _ = _SiteTail.apply(lam, wm, bm, m, v, 1e-5)
    loss = (scale * 1.5 + shift * shift).sum()
    want = torch.autograd.grad(loss, (lam, wm, bm, m, v), retain_graph=True)
    with FlopCounterMode(display=False) as counter:
        got = torch.autograd.grad(loss, (lam, wm, bm, m, v))
    assert counter.get_total_flops() > 0  # the mode saw the ATen matrix products
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES)
def test_meanstd_matches_plain_ops(dtype: torch.dtype) -> None:
    mean = torch.randn(5, 19, dtype=dtype, requires_grad=True)
    var = (torch.rand(5, 19, dtype=dtype) + 0.01).requires_grad_()
    assert native_meanstd(mean, var, 49 / 48, 1e-3) is not None
    got = _MeanStd.apply(mean, var, 49 / 48, 1e-3)
    want = mean / torch.sqrt(var * (49 / 48) + 1e-3)
    torch.testing.assert_close(got, want, **TOL[dtype])
    g = torch.randn_like(got)
    for a, w in zip(
        torch.autograd.grad(got, (mean, var), g),
        torch.autograd.grad(want, (mean, var), g),
        strict=True,
    ):
        torch.testing.assert_close(a, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_batchnorm_matches_the_modules(
    dtype: torch.dtype, momentum: float | None, shape: tuple[int, int, int]
) -> None:
    b, c, k = shape
    fc = nn.Linear(c, k, bias=False).to(dtype)
    bn = nn.BatchNorm1d(k, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    fc2, bn2 = copy.deepcopy(fc), copy.deepcopy(bn)
    for step in range(3):  # running statistics over several steps
        x = (torch.randn(b, c, dtype=dtype) * 2 + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        z = linear_batchnorm(fc, bn, x)
        assert z is not None
        z2 = bn2(fc2(x2))
        torch.testing.assert_close(z, z2, **TOL[dtype])
        g = torch.randn_like(z)
        z.backward(g)
        z2.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, **TOL[dtype])
        for p, p2 in [(fc.weight, fc2.weight), (bn.weight, bn2.weight), (bn.bias, bn2.bias)]:
            torch.testing.assert_close(p.grad, p2.grad, **TOL[dtype])
            p.grad = p2.grad = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn2, name), **TOL[dtype])


def test_linear_batchnorm_declines_what_it_cannot_do() -> None:
    x = torch.randn(4, 6)
    fc, bn = nn.Linear(6, 3, bias=False), nn.BatchNorm1d(3)
    assert linear_batchnorm(nn.Linear(6, 3), bn, x) is None  # a bias
    assert linear_batchnorm(fc, bn.eval(), x) is None  # running statistics
    assert linear_batchnorm(fc, bn.train(), x[:1]) is None  # BatchNorm1d's own error for B=1
    assert linear_batchnorm(fc, nn.BatchNorm1d(3, affine=False), x) is None
    assert linear_batchnorm(fc, bn, x.double()) is None  # dtypes differ
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_batchnorm(fc, bn, x) is None
