"""AttentiveNorm off the CPU: the folded eval site for GPUs (``_device_eval.py``) against the
module's reference path, and the ops a site launches there.

The folded site's arithmetic is device-agnostic: here it runs on CPU tensors (called directly)
and is compared with the unfused module. The meta device (shapes only, no GPU needed) takes the
same branches as CUDA and shows which ops the module's own forward and backward launch.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from layer_helpers import trained  # tests/layers on sys.path (pytest)

from an_search.layers import AttentiveNorm
from an_search.layers._device_eval import DEVICE_PLAN_ATTR, _pooled, device_eval
from an_search.layers.heads import HEADS

_SPEC = importlib.util.spec_from_file_location(
    "bench_launches", Path(__file__).parents[2] / "bench" / "launches.py"
)
_LAUNCHES = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_LAUNCHES)
CountOps = _LAUNCHES.CountOps  # ATen ops that compute: a launch each on a GPU

TOL = {torch.float32: {"rtol": 1e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-11, "atol": 1e-12}}


def _reference(an: AttentiveNorm, x: torch.Tensor) -> torch.Tensor:
    an.fused = False  # the unfused module: inner BatchNorm, head modules, mixtures
    try:
        return an(x)
    finally:
        an.fused = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool", ["meanstd", "avg"])
@pytest.mark.parametrize("head", list(HEADS))
def test_matches_reference(head: str, pool: str, dtype: torch.dtype) -> None:
    an = trained(AttentiveNorm(12, 5, head=head, pool=pool), dtype)
    x = torch.randn(6, 12, 5, 7, dtype=dtype) * 3 + 1
    with torch.no_grad():
        y = device_eval(an, x)
        assert y is not None
        torch.testing.assert_close(y, _reference(an, x), **TOL[dtype])


@pytest.mark.parametrize(
    "base,shape", [("batchnorm1d", (4, 12, 9)), ("batchnorm3d", (3, 12, 2, 3, 4)),
                   ("batchnorm", (5, 12, 1, 1))])  # fmt: skip
def test_other_ranks_and_one_position(base: str, shape: tuple) -> None:
    an = trained(AttentiveNorm(12, 4, base=base), torch.float64, dims=len(shape) - 2)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(device_eval(an, x), _reference(an, x), **TOL[torch.float64])


def test_channels_last_input_keeps_its_layout() -> None:
    an = trained(AttentiveNorm(12, 5), torch.float32)
    x = torch.randn(4, 12, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = device_eval(an, x)
        torch.testing.assert_close(y, _reference(an, x.contiguous()), **TOL[torch.float32])
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_refolds_after_parameter_and_attribute_changes() -> None:
    an = trained(AttentiveNorm(12, 5), torch.float64)
    x = torch.randn(3, 12, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        before = device_eval(an, x)
        an.weight.mul_(2.0)  # in place
        an.attn.head.fc.weight.add_(0.3)
        an.norm.eps = 0.5  # a plain attribute fold reads
        after = device_eval(an, x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, _reference(an, x), **TOL[torch.float64])


def test_declines_what_it_cannot_fold_or_differentiate() -> None:
    an = trained(AttentiveNorm(12, 5), torch.float32)
    x = torch.randn(3, 12, 4, 4)
    assert device_eval(an, x) is None  # autograd records: the folded tensors are detached
    with torch.no_grad():
        assert device_eval(an, x[:, :, 0, 0]) is None  # (B, C): no positions to pool
        assert device_eval(an, x.int()) is None
        an.norm.track_running_stats, running = False, an.norm.running_mean
        an.norm.running_mean = None  # batch statistics in eval: nothing to fold
        assert device_eval(an, x) is None
        an.norm.track_running_stats, an.norm.running_mean = True, running
        assert device_eval(an, x) is not None


@pytest.mark.parametrize("pool", ["meanstd", "avg"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_maps_compute_in_float32(dtype: torch.dtype, pool: str) -> None:
    """Statistics, head and mixtures in float32 (a float32 model, or a converted half one),
    the output rounded once to the map's dtype: within one rounding of the float32 site."""
    an = trained(AttentiveNorm(12, 5, pool=pool), torch.float32)
    x = (torch.randn(6, 12, 5, 7) * 3 + 1).to(dtype)
    with torch.no_grad():
        y = device_eval(an, x)
        want = _reference(an, x.float())
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
        halved = copy.deepcopy(an).to(dtype)  # parameters rounded to the map's dtype too
        torch.testing.assert_close(device_eval(halved, x).float(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_pooled_statistic_of_any_dtype_matches_float64(dtype: torch.dtype) -> None:
    """The head's input from the map's own values (rounded to its dtype), against the formula
    in float64 (Bessel-corrected), float32 for half-precision maps: float16 accumulates
    E[x^2] - E[x]^2 in float32; bfloat16's var_mean rounds its mean and variance once each."""
    x = (torch.randn(5, 7, 4, 6) * 2 + 3).to(dtype)  # mean^2 ~ 2 var: the terms matter
    xd = x.double().flatten(2)
    rtol = 2**-8 * 1.5 if dtype == torch.bfloat16 else 2e-6  # mean's rounding, half var's
    acc = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # the plan's
    for pool, eps in ((0, 1e-3), (1, 0.0)):
        got = _pooled(x, {"pool": pool, "eps_t": torch.full((1,), eps, dtype=acc)})
        mean = xd.mean(2)
        want = mean / (xd.var(2, correction=1) + eps).sqrt() if pool == 0 else mean
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)
    one = _pooled(x[:, :, :1, :1], {"pool": 0, "eps_t": torch.full((1,), 1e-3, dtype=acc)})
    torch.testing.assert_close(one.double(), xd[:, :, 0] / 1e-3**0.5, rtol=rtol, atol=1e-6)


def test_autocast_is_switched_off_inside() -> None:
    """Under autocast (an AMP validation pass) the folded site runs as without it: its head and
    mixtures stay float32 (no casts of the weights), the output keeps the map's dtype."""
    an = trained(AttentiveNorm(12, 5), torch.float32)
    x = torch.randn(4, 12, 6, 6) * 2 + 1
    with torch.no_grad():
        plain = device_eval(an, x.bfloat16()), device_eval(an, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = device_eval(an, x.bfloat16()), device_eval(an, x)
            assert torch.is_autocast_enabled("cpu")  # switched back on
    for a, b in zip(plain, cast, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_copies_leave_the_plan_behind() -> None:
    an = trained(AttentiveNorm(12, 5), torch.float32)
    with torch.no_grad():
        device_eval(an, torch.randn(2, 12, 3, 3))
    assert DEVICE_PLAN_ATTR in an.__dict__
    assert DEVICE_PLAN_ATTR not in copy.deepcopy(an).__dict__


def test_module_off_the_cpu_runs_eight_ops() -> None:
    """The module's eval forward on a non-CPU device takes the folded site: eight launches for
    the default head (it was fifteen: the head's BatchNorm1d, two mixtures, the batch-norm
    scale and shift), none of them folding again on the second call; eight for a bfloat16 map
    too (22 before autocast's casts, 14 with float16's moments and casts), 13 for float16. The
    mixed-dtype ops (bfloat16 variance + float32 eps, the float32 coefficients into a bfloat16
    output) are one kernel each on CUDA, which casts as it loads and stores."""
    an = AttentiveNorm(16, 6).eval().to("meta")
    x = torch.empty(8, 16, 7, 7, device="meta")
    with torch.no_grad():
        an(x)  # folds
        with CountOps() as counted:
            y = an(x)
    assert y.shape == x.shape and DEVICE_PLAN_ATTR in an.__dict__
    assert counted.ops == {"var_mean": 1, "add": 1, "rsqrt_": 1, "mul_": 1, "addmm": 1,
                           "hardsigmoid": 1, "mm": 1, "addcmul": 1}, counted.ops  # fmt: skip
    with torch.no_grad():
        x16 = x.to(torch.bfloat16)
        an(x16)  # folds for float32 compute
        with CountOps() as counted:
            an(x16)
    want = {"var_mean": 1, "add": 1, "rsqrt_": 1, "mul_": 1, "addmm": 1, "hardsigmoid": 1,
            "mm": 1, "addcmul": 1}  # fmt: skip
    assert counted.ops == want, counted.ops
    with torch.no_grad():
        x16 = x.to(torch.float16)
        an(x16)
        with CountOps() as counted:
            an(x16)
    want = {"mean": 1, "linalg_vector_norm": 1, "pow": 1, "div": 1, "addcmul": 2,
            "clamp_min": 1, "mul_": 1, "add_": 1, "rsqrt_": 1, "mul": 1, "addmm": 1,
            "hardsigmoid": 1, "mm": 1}  # fmt: skip
    assert counted.ops == want, counted.ops
    cpu = AttentiveNorm(16, 6).eval()
    with torch.no_grad(), CountOps() as counted:
        cpu(torch.randn(2, 16, 3, 3))  # the CPU keeps its own paths
    assert "addmm" not in counted.ops and DEVICE_PLAN_ATTR not in cpu.__dict__


def test_module_off_the_cpu_keeps_the_plain_ops_where_it_declines() -> None:
    an = AttentiveNorm(16, 6).to("meta").eval()
    x = torch.empty(8, 16, 7, 7, device="meta", requires_grad=True)
    with CountOps() as counted:
        an(x)  # autograd records
    assert "addmm" not in counted.ops and DEVICE_PLAN_ATTR not in an.__dict__
    assert counted.ops["native_batch_norm"] == 1  # the head's BatchNorm1d, as a module


def test_off_the_cpu_training_uses_stock_batchnorms() -> None:
    """Off the CPU (the meta device stands in for a GPU: shapes only) the eager training
    site is launch-bound: the head's Linear + BatchNorm1d must be stock modules (one kernel,
    running statistics updated in it), not the CPU kernels' fallback in elementwise ops (ten
    ops forward, four running-stat updates; it was, and made it 27 ops, the backward 41)."""
    an = AttentiveNorm(12, 5).to("meta").train()
    x = torch.empty(8, 12, 5, 5, device="meta", requires_grad=True)
    with CountOps() as counted:
        y = an(x)
    ops = counted.ops
    assert ops["native_batch_norm"] == 2  # the site's norm and the head's
    assert ops["mm"] == 3 and ops["var_mean"] == 1  # head; the two mixtures; the moments
    assert sum(ops.values()) <= 15, ops
    with CountOps() as counted:
        y.backward(torch.empty_like(y))
    assert counted.ops["native_batch_norm_backward"] == 2, counted.ops
    assert sum(counted.ops.values()) <= 30, counted.ops


@pytest.mark.parametrize("site", ["cpu plan", "device plan"])
def test_data_edits_fold_after_refresh_or_a_mode_round_trip(site: str) -> None:
    """``.data`` edits move no version counter, so the cached plan cannot see them:
    ``refresh()`` and a train/eval round trip (where such edits happen in training) drop it."""
    an = trained(AttentiveNorm(12, 5), torch.float64)
    x = torch.randn(3, 12, 4, 4, dtype=torch.float64)

    def run() -> torch.Tensor:
        return an(x) if site == "cpu plan" else device_eval(an, x)

    with torch.no_grad():
        before = run()
        an.weight.data.mul_(2.0)
        assert torch.equal(run(), before)  # stale: what refresh() is for
        an.refresh()
        torch.testing.assert_close(run(), _reference(an, x), **TOL[torch.float64])
        an.train()
        an.bias.data.add_(0.5)
        an.attn.head.fc.weight.data.add_(0.3)
        an.eval()
        after = run()
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, _reference(an, x), **TOL[torch.float64])
