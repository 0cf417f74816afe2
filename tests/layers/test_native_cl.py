"""The channels-last C kernels (``_native_cl.c``) against float64 formulas written here, and
AttentiveNorm's eval path on channels-last maps against its reference path on the same values
in the contiguous layout."""

from __future__ import annotations

import copy

import pytest
import torch
from layer_helpers import DTYPES, TOL, avx2, moments_ref, needs_native, trained

from an_search.layers import AttentiveNorm, _fused, _native
from an_search.layers._eval_plan import eval_plan
from an_search.layers.heads import HEADS

pytestmark = needs_native


def _check_moments(x3: torch.Tensor, offset: float) -> None:
    mean, var = _native.native_moments_cl(x3)
    mean_ref, var_ref = moments_ref(x3, 1)
    assert mean.dtype == var.dtype == x3.dtype and mean.shape == (x3.shape[0], x3.shape[2])
    torch.testing.assert_close(mean.double(), mean_ref, **TOL[x3.dtype])
    scale = var_ref.clamp(min=1.0 if offset else 0.0) if x3.dtype == torch.float32 else var_ref
    assert ((var.double() - var_ref).abs() <= 3e-6 * scale + 1e-12).all()
    assert (var >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 49, 64, 65, 196])
@pytest.mark.parametrize("c", [12, 40, 64, 100])  # 100: 64-byte, 32-byte blocks, then columns
@pytest.mark.parametrize("offset", [0.0, 3.0, 1e4])
def test_moments_match_two_pass_double(dtype: torch.dtype, n: int, c: int, offset: float) -> None:
    """Whole column blocks (32 float32 or 16 float64 channels) and the rest; sums folded every
    64 positions; 3 samples over 2 threads (a sample each) and a lone one (column blocks)."""
    torch.set_num_threads(2)
    x3 = (torch.randn(3, n, c, dtype=torch.float64) + offset).to(dtype)
    x3[0, :, 0] = 2.5  # a constant column: variance exactly 0
    _check_moments(x3, offset)
    _check_moments(x3[1:2].clone(), offset)
    assert _native.native_moments_cl(x3)[1][0, 0] == 0


def test_a_lone_large_sample_splits_its_columns_over_threads() -> None:
    torch.set_num_threads(2)
    x3 = torch.randn(1, 1024, 96) * 2 + 1  # 98304 values: from 65536 the passes take threads
    _check_moments(x3, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_columns_far_from_their_shift_are_summed_again(dtype: torch.dtype) -> None:
    """A large value where the shift samples the column, zeros elsewhere: the shifted one-pass
    sums would cancel; the column is read again two-pass. A NaN column stays NaN."""
    x3 = torch.zeros(2, 3136, 40, dtype=dtype)
    x3[:, 0, :] = 1e4
    x3[:, :, 1] += torch.rand(2, 3136, dtype=dtype)
    x3[1, 5, 7] = float("nan")
    mean, var = _native.native_moments_cl(x3)
    mean_ref, var_ref = moments_ref(x3, 1)
    ok = ~torch.isnan(var_ref)
    torch.testing.assert_close(var.double()[ok], var_ref[ok], rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double()[ok], mean_ref[ok], rtol=2e-6, atol=0)
    assert torch.isnan(var[1, 7]) and int(torch.isnan(var).sum()) == 1


def _eval_pair(an: AttentiveNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``an(x)`` for a channels-last ``x``, the reference path's output on the same values,
    and how many times the plan's channels-last kernel ran."""
    calls = []
    with torch.no_grad():
        an(x.contiguous())  # builds the plan
        plan = eval_plan(an, x.dtype)
        kernel = plan.fn_cl
        plan.fn_cl = lambda *args: calls.append(1) or kernel(*args)
        y = an(x)
        an.fused = False
        y_ref = an(x.contiguous())
        an.fused = True
    return y, y_ref, len(calls)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", ["meanstd", "avg"])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("c", [40, 100])  # 100: wide and plain vectors of channels, then the rest
def test_eval_path_matches_reference(
    head: str, pool: str, dtype: torch.dtype, batch: int, c: int
) -> None:
    torch.set_num_threads(2)  # batch 1 < threads: column blocks and positions; 4: samples
    an = trained(AttentiveNorm(c, 5, head=head, pool=pool), dtype)
    x = (torch.randn(batch, c, 6, 7, dtype=dtype) * 3 + 1).to(memory_format=torch.channels_last)
    y, y_ref, calls = _eval_pair(an, x)
    assert calls == 1
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_path_on_channels_last_3d_maps(dtype: torch.dtype) -> None:
    an = trained(AttentiveNorm(24, 4, base="batchnorm3d"), dtype, dims=3)
    x = torch.randn(3, 24, 4, 5, 3, dtype=dtype).to(memory_format=torch.channels_last_3d)
    y, y_ref, calls = _eval_pair(an, x)
    assert calls == 1 and y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_path_on_transposed_sequences(dtype: torch.dtype) -> None:
    """A BatchNorm1d site fed (B, L, C) memory as (B, C, L) (``h.transpose(1, 2)``)."""
    an = trained(AttentiveNorm(24, 4, base="batchnorm1d"), dtype, dims=1)
    x = torch.randn(3, 30, 24, dtype=dtype).transpose(1, 2)
    y, y_ref, calls = _eval_pair(an, x)
    assert calls == 1 and y.stride() == x.stride()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8])
def test_eval_path_on_streamed_outputs(dtype: torch.dtype, batch: int) -> None:
    """Outputs of 1 MiB and more whose positions start on a vector are streamed (AVX2);
    batch 1: a lone sample of 1.2 MiB, its positions over the threads."""
    torch.set_num_threads(2)
    an = trained(AttentiveNorm(64, 6), dtype)
    shape = (8, 64, 24, 24) if batch == 8 else (1, 64, 72, 72)  # 1.2-1.3 MiB in float32
    x = torch.randn(*shape, dtype=dtype).to(memory_format=torch.channels_last)
    y, y_ref, calls = _eval_pair(an, x)
    assert calls == 1
    assert _native.native_cl_streams(y) == avx2()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


def test_streaming_store_rule() -> None:
    big = torch.empty(2, 64, 64, 64).to(memory_format=torch.channels_last)  # 2 MiB
    assert _native.native_cl_streams(big) == avx2()
    assert not _native.native_cl_streams(torch.empty(2, 64, 32, 32))  # 512 KiB
    odd = torch.empty(2, 36, 64, 64).to(memory_format=torch.channels_last)  # rows of 144 B
    assert not _native.native_cl_streams(odd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(3, 40, 5, 6), (1, 12, 7, 7), (2, 64, 1, 130), (1, 96, 32, 32), (3, 100, 5, 6)]
)
def test_training_kernels_match_formulas(dtype: torch.dtype, shape: tuple) -> None:
    """y = x * a + t, y = g * a + x * c + d, sum(g * x) and sum(g) per (sample, channel) of
    channels-last maps: whole vectors of channels and the rest, sums folded every 64 positions,
    a lone sample of 98304 values over the threads."""
    torch.set_num_threads(2)
    b, c = shape[:2]
    x, g = (torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last) for _ in "xg")
    a, t, cc, d = (torch.randn(b, c, dtype=dtype) for _ in range(4))
    col = (b, c, 1, 1)
    y = _native.native_affine(x, a, t)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, x * a.view(col) + t.view(col), **TOL[dtype])
    y = _native.native_affine_grad(g, x, a, cc, d)
    ref = g * a.view(col) + x * cc.view(col) + d.view(col)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    sgx, sg = _native.native_row_dots(g, x, b * c)
    gd, xd = g.double(), x.double()
    torch.testing.assert_close(sgx.double().view(b, c), (gd * xd).sum((2, 3)), **TOL[dtype])
    torch.testing.assert_close(sg.double().view(b, c), gd.sum((2, 3)), **TOL[dtype])


def test_training_on_a_channels_last_map_takes_its_kernels(monkeypatch) -> None:
    """The fused training path of a channels-last map (a head the one-node site declines): its
    moments, affine, row dots and input gradient in the channels-last kernels (ATen's
    reductions and broadcasts over such a map took 2-14x BatchNorm's time); outputs, all
    gradients and running statistics as the contiguous map's. (The one-node site's own
    channels-last passes: test_cpu_site.py.)"""
    kernels = []
    moments_cl, resolve = _native.native_moments_cl, _native._pass

    def channels_last_pass(name: str, rows: int, *maps: torch.Tensor) -> tuple | None:
        kernel = resolve(name, rows, *maps)
        if kernel is not None and len(kernel[1]) == 3:  # sizes (B, n, C): a channels-last one
            kernels.append(name)
        return kernel

    monkeypatch.setattr(
        _fused, "native_moments_cl", lambda x3: kernels.append("moments") or moments_cl(x3)
    )
    monkeypatch.setattr(_native, "_pass", channels_last_pass)
    an = AttentiveNorm(40, 5, head="mlp-bn").double()
    twin = copy.deepcopy(an)
    x = torch.randn(4, 40, 6, 6, dtype=torch.double) * 2 + 1
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    x_ct = x.clone().requires_grad_()
    y, y_ref = an(x_cl), twin(x_ct)
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert {"moments", "an_affine", "an_row_dots", "an_affine_grad"} <= set(kernels), kernels
    torch.testing.assert_close(x_cl.grad, x_ct.grad)
    for (name, p), p_ref in zip(an.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    for buf, buf_ref in zip(an.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(buf, buf_ref)
