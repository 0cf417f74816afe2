"""The fused BatchNorm/GroupNorm fast path against a straightforward unfused reference.

The reference is written here: the inner ``nn.BatchNorm`` module (exact running-stat
semantics) or ``F.group_norm`` for x_hat, ``torch.var`` for the statistic, an einsum for the
mixture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from an_search.layers import AttentiveNorm, _fused, _native
from an_search.layers._fused import moments

C, K = 6, 3


@pytest.fixture(autouse=True, params=["native", "aten", "device-ops"])
def _kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with the C kernels of ``_native.c``, with stock ATen ops only, and with
    the ops that tensors off the CPU take (``var_mean``, ``addcmul``, autograd's own backward
    of the moments), here on CPU tensors."""
    if request.param == "native":
        if _native.library() is None:
            pytest.skip(f"native kernels: {_native.unavailable_reason()}")
        return
    monkeypatch.setattr(_native, "_STATE", {"lib": None, "reason": "test: ATen only"})
    if request.param == "device-ops":
        monkeypatch.setattr(_fused, "_device_ops", lambda x: True)


def _unfused(ref: AttentiveNorm, x: torch.Tensor) -> torch.Tensor:
    """F.batch_norm / F.group_norm + einsum, using ``ref``'s own modules and parameters."""
    dims = tuple(range(2, x.dim()))
    s = x.mean(dims) / torch.sqrt(x.var(dims, unbiased=True) + 1e-3)
    lam = ref.attn.head(s)  # (B, K)
    if ref.base == "groupnorm":
        x_hat = F.group_norm(x, ref.norm.num_groups, None, None, ref.norm.eps)
    else:
        x_hat = ref.norm(x)  # nn.BatchNorm*d(affine=False): running stats, momentum, counter
    gamma = torch.einsum("bk,kc->bc", lam, ref.weight)
    beta = torch.einsum("bk,kc->bc", lam, ref.bias)
    shape = x.shape[:2] + (1,) * (x.dim() - 2)
    return gamma.view(shape) * x_hat + beta.view(shape)


def _run_pair(
    an: AttentiveNorm, x: torch.Tensor, modes: list[bool], frozen_norm: bool = False
) -> AttentiveNorm:
    """Run fused ``an`` and the unfused reference on a copy through ``modes``; compare all.
    ``frozen_norm``: the inner BatchNorm in eval mode whatever the site's mode."""
    ref = copy.deepcopy(an)
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    for training in modes:
        an.train(training)
        ref.train(training)
        if frozen_norm:
            an.norm.eval()
            ref.norm.eval()
        y, y_ref = an(x), _unfused(ref, x_ref)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(an.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    for (name, b), b_ref in zip(an.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, msg=name)
    return ref


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize(
    "base,shape",
    [("batchnorm", (5, C, 4, 3)), ("batchnorm1d", (5, C, 7)), ("batchnorm3d", (3, C, 2, 3, 2))],
)
def test_batchnorm_fused_matches_unfused(base: str, shape: tuple, momentum: float | None) -> None:
    an = AttentiveNorm(C, K, base=base, momentum=momentum).double()
    x = (torch.randn(shape, dtype=torch.double) * 2 + 1).requires_grad_()
    ref = _run_pair(an, x, [True, True, True, False])
    assert int(an.norm.num_batches_tracked) == int(ref.norm.num_batches_tracked) == 3


def test_frozen_inner_batchnorm_in_a_training_site() -> None:
    """``norm.eval()`` inside a training site (a frozen BatchNorm, as fine-tuning recipes do):
    its running statistics normalise and stay as they are while the head trains, as the
    reference calls the module. The fused paths had taken the site's mode: batch statistics,
    running ones updated, the output off by ~2 (the C one-node site now declines)."""
    an = AttentiveNorm(C, K).double()
    with torch.no_grad():
        for _ in range(2):
            an(torch.randn(5, C, 4, 3, dtype=torch.double) * 2 + 1)  # statistics != init
    running = [b.clone() for b in an.norm.buffers()]
    head = an.attn.head.norm.running_mean.clone()
    x = (torch.randn(5, C, 4, 3, dtype=torch.double) * 3 - 1).requires_grad_()
    _run_pair(an, x, [True, True], frozen_norm=True)
    assert all(torch.equal(a, b) for a, b in zip(an.norm.buffers(), running, strict=True))
    assert not torch.equal(an.attn.head.norm.running_mean, head)  # the head still trains


def test_groupnorm_fused_matches_unfused() -> None:
    an = AttentiveNorm(C, K, base="groupnorm", head="gn-hsigmoid", num_groups=3).double()
    _run_pair(an, (torch.randn(4, C, 5, 5, dtype=torch.double) + 2).requires_grad_(), [True, False])


def test_running_stats_match_batchnorm2d_in_float32() -> None:
    an = AttentiveNorm(C, K).train()
    bn = nn.BatchNorm2d(C, affine=False).train()
    for _ in range(4):
        x = torch.randn(8, C, 6, 6) * 3 + 2
        an(x)
        bn(x)
    torch.testing.assert_close(an.norm.running_mean, bn.running_mean)
    torch.testing.assert_close(an.norm.running_var, bn.running_var)
    assert int(an.norm.num_batches_tracked) == int(bn.num_batches_tracked) == 4


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("base", ["batchnorm", "groupnorm"])
def test_gradcheck_fused(base: str, training: bool) -> None:
    an = AttentiveNorm(4, K, base=base, num_groups=2, head="linear-hsigmoid").double()
    an.train(training)
    x = torch.randn(3, 4, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(an, (x,))


@pytest.mark.parametrize("offset", [0.0, 1.5, 30.0, 1000.0])
def test_float32_moments_stay_accurate_for_any_offset(offset: float) -> None:
    """One-pass E[x^2] - E[x]^2 cancels for |mean| >> std; those rows are redone two-pass."""
    x = torch.randn(4, C, 300)
    x[:2] += offset  # half the rows well conditioned, half not
    mean, var = moments(x)
    torch.testing.assert_close(mean.double(), x.double().mean(2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var.double(), x.double().var(2, unbiased=False), rtol=3e-6, atol=0)


def test_float32_large_offset_matches_double_reference() -> None:
    an = AttentiveNorm(C, K).train()
    ref = copy.deepcopy(an).double()
    x = torch.randn(8, C, 7, 7) + 30.0
    torch.testing.assert_close(an(x).double(), _unfused(ref, x.double()), atol=1e-4, rtol=1e-4)


def test_channels_last_memory_format_matches_contiguous() -> None:
    an = AttentiveNorm(C, K).double()
    x = torch.randn(4, C, 5, 5, dtype=torch.double)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    _run_pair(an, x_cl, [True, False])


def test_input_without_grad_still_trains_parameters() -> None:
    an = AttentiveNorm(C, K).double()
    _run_pair(an, torch.randn(4, C, 5, 5, dtype=torch.double), [True])
    assert an.weight.grad is not None and an.attn.head.fc.weight.grad is not None


def test_grad_of_input_only() -> None:
    an = AttentiveNorm(C, K).double()
    ref = copy.deepcopy(an)
    x = torch.randn(4, C, 5, 5, dtype=torch.double, requires_grad=True)
    (gx,) = torch.autograd.grad(an(x).square().sum(), x)
    (gx_ref,) = torch.autograd.grad(_unfused(ref, x).square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)


def test_without_running_stats_eval_uses_batch_statistics() -> None:
    an = AttentiveNorm(C, K, track_running_stats=False).double().eval()
    x = torch.randn(4, C, 5, 5, dtype=torch.double)
    assert an.norm.running_mean is None
    _run_pair(an, x.requires_grad_(), [False, True])


def test_bfloat16_input_keeps_dtype() -> None:
    an = AttentiveNorm(C, K).eval()
    x = torch.randn(4, C, 5, 5)
    y16 = an(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), an(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("offset", [0.0, 20.0])
def test_bfloat16_moments_accumulate_in_float32(offset: float) -> None:
    x = (torch.randn(4, C, 300) + offset).bfloat16()
    mean, var = moments(x)
    assert mean.dtype == var.dtype == torch.float32
    x64 = x.double()  # the same bfloat16 values, exactly
    torch.testing.assert_close(mean.double(), x64.mean(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), x64.var(2, unbiased=False), atol=0, rtol=1e-3)


def test_bfloat16_training_step_follows_float32() -> None:
    an = AttentiveNorm(C, K).train()
    an16 = copy.deepcopy(an)
    x = torch.randn(4, C, 6, 6)
    x16 = x.bfloat16().requires_grad_()
    x32 = x16.detach().float().requires_grad_()  # the same input values
    g = torch.randn(x.shape)
    an(x32).backward(g)
    y16 = an16(x16)
    y16.backward(g.bfloat16())
    assert y16.dtype == x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad.float(), x32.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(an16.weight.grad, an.weight.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(an16.norm.running_var, an.norm.running_var, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bfloat16_autocast_follows_float32(training: bool) -> None:
    """Under autocast the head's linear runs in bfloat16: mixed-dtype scale, shift and map."""
    conv = nn.Conv2d(3, C, 3, padding=1)
    an = AttentiveNorm(C, K).train(training)
    ref = copy.deepcopy(an)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = an(h)
    assert h.dtype == y.dtype == torch.bfloat16
    y_ref = ref(h.detach().float())
    torch.testing.assert_close(y.float(), y_ref, atol=0.05, rtol=0.05)
    if training:
        y.float().square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(an.weight.grad, ref.weight.grad, atol=0.1, rtol=0.05)
        assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_single_value_per_channel_in_training_raises_like_batchnorm() -> None:
    an = AttentiveNorm(C, K, base="batchnorm1d", head="linear-sigmoid").train()
    with pytest.raises(ValueError, match="more than 1 value"):
        an(torch.randn(1, C))


@pytest.mark.parametrize("base", ["batchnorm", "groupnorm", "layernorm2d", "layernorm"])
def test_output_can_be_modified_in_place(base: str) -> None:
    """Residual blocks do ``x += shortcut`` and in-place ReLU on the norm's output."""
    an = AttentiveNorm(C, K, base=base, num_groups=3).double().train()
    ref = copy.deepcopy(an)
    shape = (4, 5, 5, C) if base == "layernorm" else (4, C, 5, 5)
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = an(x)
    y += 1.0
    y.relu_().sum().backward()
    torch.relu(ref(x_ref) + 1.0).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(an.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("base", ["batchnorm", "groupnorm", "layernorm2d"])
def test_jit_trace_sees_plain_aten_ops(base: str) -> None:
    """fvcore and ONNX trace with torch.jit: no custom Function, same values."""
    an = AttentiveNorm(C, K, base=base, num_groups=3).eval()
    x = torch.randn(2, C, 4, 4)
    graph, out = torch.jit._get_trace_graph(an, (x,))
    kinds = {node.kind() for node in graph.nodes()}
    assert "prim::PythonOp" not in kinds and "aten::var_mean" in kinds
    torch.testing.assert_close(out, an(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_single_position(training: bool) -> None:
    """BatchNorm1d on (B, C): one position per sample, variance exactly 0."""
    an = AttentiveNorm(4, K, base="batchnorm1d").double().train(training)
    x = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(an, (x,))


def test_wrong_input_rank_raises_like_batchnorm() -> None:
    with pytest.raises(ValueError, match="expected 4D input"):
        AttentiveNorm(C, K)(torch.randn(4, C, 5))
    with pytest.raises(ValueError, match="expected 2 or 3D input"):
        AttentiveNorm(C, K, base="batchnorm1d")(torch.randn(4, C, 5, 5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_traces_one_graph_and_matches(training: bool) -> None:
    """Under torch.compile the fused algorithm runs as plain ops: no graph break, same numbers
    (``aot_eager``: Dynamo + AOTAutograd without inductor's C++ build). In float64: in float32
    the two paths' sums run in different orders (weight gradients apart by ~1e-5 relative on
    some CPUs)."""
    torch._dynamo.reset()
    an = AttentiveNorm(C, K).train(training).double()
    ref = copy.deepcopy(an)
    ref.fused = False
    x = torch.randn(4, C, 5, 5, dtype=torch.float64).relu_().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = torch.compile(an, backend="aot_eager", fullgraph=True)(x)
    y_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(an.weight.grad, ref.weight.grad)
    torch.testing.assert_close(an.norm.running_var, ref.norm.running_var)


def _second_derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """d/dx |d/dx sum((x + fn(x))^2)|^2: a residual block's gradient penalty."""
    x = x.detach().clone().requires_grad_()
    y = x + fn(x)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), x)
    return h


@pytest.mark.parametrize(
    ("training", "settings"),
    [(True, {}), (False, {}), (True, {"base": "layernorm2d", "head": "linear-sigmoid"})],
    ids=["train", "eval", "layernorm2d"],
)
def test_a_second_derivative_is_right_or_refused(
    request: pytest.FixtureRequest, training: bool, settings: dict
) -> None:
    """AN's backward runs once: ``create_graph=True`` raises (before, the second ``grad`` of a
    residual block came out silently without AN's share). Off the CPU, an eval site is
    autograd's own ops: torch's error for the default head's Hardsigmoid, and with another
    head, the unfused second derivative."""
    an = AttentiveNorm(C, K, **settings).train(training).double()
    ref = copy.deepcopy(an)
    x = torch.randn(4, C, 5, 5, dtype=torch.float64)
    device_ops = request.node.callspec.params["_kernels"] == "device-ops"
    if device_ops and settings:
        h = _second_derivative(an, x)
        torch.testing.assert_close(h, _second_derivative(lambda t: _unfused(ref, t), x))
        assert h.abs().sum() > 0
        return
    error = "AttentiveNorm has no double backward"
    if device_ops and not training:
        error = "derivative for aten::hardsigmoid_backward is not implemented"
    with pytest.raises(RuntimeError, match=error):
        _second_derivative(an, x)
    x.requires_grad_()
    (g,) = torch.autograd.grad((x + an(x)).pow(2).sum(), x)  # a first derivative still is
    (g_ref,) = torch.autograd.grad((x + _unfused(ref, x)).pow(2).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_the_input_gradient_of_a_1x1_map_keeps_float32_precision() -> None:
    """On a 1x1 map (x = its mean, variance 0) the variance's share of dx is 0. Formed as
    c * x - c * mean, with c ~ 1/sqrt(eps)^3 there, it cancelled: a median relative error of
    2e-3 at offset 30, 2000x float32's."""
    torch.manual_seed(0)
    an = AttentiveNorm(64, 10)
    ref = copy.deepcopy(an).double()
    x = (torch.randn(16, 64, 1, 1) + 30).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    g = torch.randn(16, 64, 1, 1)
    an(x).backward(g)
    ref(x_ref).backward(g.double())
    rel = ((x.grad.double() - x_ref.grad).abs() / x_ref.grad.abs()).median().item()
    assert rel < 1e-5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_under_autocast_traces_one_graph(training: bool) -> None:
    """The mixtures run in float32 with autocast off (eager: a flag toggled; compiled: the
    ``torch.autocast(enabled=False)`` region Dynamo traces): one graph under bfloat16 autocast,
    and the numbers of the eager site under the same autocast."""
    torch._dynamo.reset()
    an = AttentiveNorm(C, K).train(training)
    ref = copy.deepcopy(an)
    x = torch.randn(4, C, 5, 5).relu_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(an, backend="aot_eager", fullgraph=True)(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
