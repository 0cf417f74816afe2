"""The one-node CPU training site (``_cpu_site.py``) against AttentiveNorm's reference path
(``fused = False``: the inner BatchNorm module, the pool, the head's own modules, the mixture
and the affine as autograd ops), over several training steps: outputs, the input's and every
parameter's gradient, running statistics and counters of the site and of the head."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from an_search.layers import AttentiveNorm, _native

pytestmark = pytest.mark.skipif(
    _native.library() is None, reason=f"native kernels: {_native.unavailable_reason()}"
)
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-11}}


def _one_node(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__ == "_SiteBackward"


def _compare(an: AttentiveNorm, x: torch.Tensor, steps: int = 3, node: bool = True) -> None:
    ref = copy.deepcopy(an)
    ref.fused = False
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    tol = TOL[x.dtype]
    for _ in range(steps):
        y, y_ref = an(x), ref(x_ref)
        assert _one_node(y) == node
        torch.testing.assert_close(y, y_ref, **tol)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for (name, p), p_ref in zip(an.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name, **tol)
    for (name, b), b_ref in zip(an.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, msg=name, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool", ["meanstd", "avg"])
@pytest.mark.parametrize("head", ["default", "bn-sigmoid", "bn-softmax"])
def test_matches_reference(head: str, pool: str, dtype: torch.dtype) -> None:
    an = AttentiveNorm(12, 5, head=head, pool=pool).to(dtype).train()
    x = (torch.randn(6, 12, 5, 4, dtype=dtype) * 2 + 1).requires_grad_()
    _compare(an, x)


@pytest.mark.parametrize(
    "base,shape",
    [("batchnorm1d", (5, 12)), ("batchnorm1d", (5, 12, 7)), ("batchnorm3d", (3, 12, 2, 3, 2))],
)
def test_other_ranks(base: str, shape: tuple) -> None:
    an = AttentiveNorm(12, 4, base=base).double().train()
    _compare(an, (torch.randn(shape, dtype=torch.double) + 1).requires_grad_())


def test_cumulative_momentum_no_running_stats_and_no_input_grad() -> None:
    an = AttentiveNorm(12, 4, momentum=None).double().train()
    an.attn.head.norm.momentum = None  # the head's BatchNorm1d too
    _compare(an, torch.randn(4, 12, 3, 3, dtype=torch.double).requires_grad_(), steps=4)
    assert int(an.norm.num_batches_tracked) == int(an.attn.head.norm.num_batches_tracked) == 4
    free = AttentiveNorm(12, 4, track_running_stats=False).double().train()
    assert free.norm.running_mean is None
    _compare(free, torch.randn(4, 12, 3, 3, dtype=torch.double))  # parameters' grads only


def test_running_statistics_match_batchnorm_in_float32() -> None:
    """The C update (lerp, unbiased variance, counter) against nn.BatchNorm2d itself."""
    an, bn = AttentiveNorm(12, 4).train(), nn.BatchNorm2d(12, affine=False).train()
    for _ in range(5):
        x = torch.randn(8, 12, 6, 6) * 3 + 2
        assert _one_node(an(x.requires_grad_()))
        bn(x)
    torch.testing.assert_close(an.norm.running_mean, bn.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(an.norm.running_var, bn.running_var, rtol=1e-6, atol=0)
    assert int(an.norm.num_batches_tracked) == int(bn.num_batches_tracked) == 5


def test_gradcheck() -> None:
    an = AttentiveNorm(4, 3).double().train()
    x = torch.randn(3, 4, 3, 2, dtype=torch.double, requires_grad=True)
    assert _one_node(an(x))
    assert torch.autograd.gradcheck(an, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "fmt,shape",
    [(torch.channels_last, (6, 40, 5, 4)), (torch.channels_last, (6, 12, 1, 70)),
     (torch.channels_last_3d, (6, 12, 2, 3, 2))],
)  # fmt: skip
def test_channels_last_maps(fmt: torch.memory_format, shape: tuple, dtype: torch.dtype) -> None:
    """The same node with the channels-last passes (``_native_cl.c``): whole vectors of
    channels and the rest, 70 positions (sums folded every 64); the output keeps the layout."""
    base = "batchnorm3d" if len(shape) == 5 else "batchnorm"
    an = AttentiveNorm(shape[1], 5, base=base).to(dtype).train()
    x = (torch.randn(shape, dtype=dtype) * 2 + 1).contiguous(memory_format=fmt)
    assert an(x).is_contiguous(memory_format=fmt)
    _compare(an, x.requires_grad_())
    assert x.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("why", ["avgmax", "mlp-bn", "linear-sigmoid", "groupnorm", "eval"])
def test_what_it_declines_takes_the_fused_path(why: str) -> None:
    kwargs = {"avgmax": {"pool": "avgmax"}, "groupnorm": {"base": "groupnorm", "num_groups": 3}}
    head = why if why in ("mlp-bn", "linear-sigmoid") else "default"
    an = AttentiveNorm(12, 4, head=head, **kwargs.get(why, {})).double().train(why != "eval")
    x = torch.randn(4, 12, 3, 5, dtype=torch.double)
    _compare(an, x.requires_grad_(), steps=2, node=False)


def test_dispatch_modes_see_the_ops() -> None:
    """Under FlopCounterMode (fvcore-like counting) the site runs as ops the mode can see."""
    an = AttentiveNorm(12, 4).train()
    x = torch.randn(4, 12, 3, 5, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = an(x)
    assert not _one_node(y) and counter.get_total_flops() > 0


def test_evaluation_after_more_training_refolds() -> None:
    """The C kernels write the running statistics through pointers; the site records those
    writes (version counters), so the eval plan folded after the first step folds again after
    more training steps with no optimizer step between (BatchNorm recalibration): it had kept
    the first statistics (eval output off by ~2.5 here)."""
    torch.manual_seed(0)
    an = AttentiveNorm(16, 4)
    x = torch.randn(8, 16, 5, 5)

    def eval_error() -> float:
        an.eval()
        ref = copy.deepcopy(an)
        ref.fused = False
        with torch.no_grad():
            err = float((an(x) - ref(x)).abs().max())
        an.train()
        return err

    versions = [t._version for t in (an.norm.running_var, an.attn.head.norm.running_mean)]
    assert _one_node(an(x * 3 + 1))
    assert [t._version for t in (an.norm.running_var, an.attn.head.norm.running_mean)] == [
        v + 1 for v in versions
    ]
    assert eval_error() < 1e-5
    with torch.no_grad():
        for _ in range(3):
            an(x * 3 + 2)  # recalibration: statistics move, parameters do not
    assert eval_error() < 1e-5


class _Half(torch.nn.Module):
    """A parametrization: the weight used is half the one stored."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 0.5


@pytest.mark.parametrize("where", ["prune-head", "prune-mixture", "parametrize-head",
                                   "parametrize-mixture"])  # fmt: skip
def test_pruned_or_parametrized_weights_are_the_ones_used(where: str) -> None:
    """``torch.nn.utils.prune`` / ``parametrize`` on the head's linear or AN's mixture: a
    training step and the evaluation after it use the weights they make, as a plain AN given
    those weights computes (before: KeyError in training, and a fold of stale weights)."""
    from torch.nn.utils import parametrize, prune

    torch.manual_seed(0)
    an = AttentiveNorm(8, 3, head="bn-sigmoid").double()
    plain = copy.deepcopy(an)
    kind, part = where.split("-")
    owner = an.attn.head.fc if part == "head" else an
    twin = plain.attn.head.fc if part == "head" else plain
    if kind == "prune":
        prune.l1_unstructured(owner, "weight", amount=0.5)
        stored = owner.weight_orig
    else:
        parametrize.register_parametrization(owner, "weight", _Half())
        stored = owner.parametrizations.weight.original
    for _ in range(2):
        with torch.no_grad():  # an optimizer's step on what is stored
            stored.add_(torch.randn_like(stored))
            used = stored * owner.weight_mask if kind == "prune" else stored * 0.5
            twin.weight.copy_(used)
        an.train(), plain.train()
        x = (torch.randn(4, 8, 5, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
        x_plain = x.detach().clone().requires_grad_()
        y, y_plain = an(x), plain(x_plain)
        torch.testing.assert_close(y, y_plain)
        y.square().sum().backward()
        y_plain.square().sum().backward()
        torch.testing.assert_close(x.grad, x_plain.grad)
        an.eval(), plain.eval()
        with torch.no_grad():
            x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
            torch.testing.assert_close(an(x), plain(x))
