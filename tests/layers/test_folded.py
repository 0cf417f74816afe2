"""``AttentiveNorm.fuse()`` and :class:`FoldedAttentiveNorm`: the evaluation-mode function as
folded buffers, against the AttentiveNorm it came from (its own evaluation: the same kernel on
the same folded numbers, so equal bit for bit on the CPU; its reference path, ``fused =
False``, written with the unfolded modules) and through timm's ``reparameterize_model``."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from layer_helpers import DTYPES, TOL, needs_native, trained

from an_search import convert, fold_sites
from an_search.layers import AttentiveNorm, FoldedAttentiveNorm

FOLDED_HEADS = ["default", "linear-sigmoid", "bn-softmax", "gn-hsigmoid", "mlp", "mlp-bn"]


def _reference(an: AttentiveNorm, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(an)
    ref.fused = False
    return ref(x)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", FOLDED_HEADS)
@pytest.mark.parametrize("pool", ["meanstd", "avg"])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_fuse_computes_the_evaluation(
    dtype: torch.dtype, head: str, pool: str, layout: str
) -> None:
    an = trained(AttentiveNorm(24, 5, head=head, pool=pool), dtype)
    folded = an.fuse()
    assert isinstance(folded, FoldedAttentiveNorm)
    assert all(b.dtype == torch.float64 for b in folded.buffers())
    x = torch.randn(3, 24, 6, 5, dtype=dtype) * 2 + 1
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = folded(x)
        assert torch.equal(y, an(x))  # the same kernel on the same folded tensors
        torch.testing.assert_close(y, _reference(an, x), **TOL[dtype])
    assert y.stride() == x.stride()


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_slice_or_a_permute_takes_the_kernel_as_a_contiguous_map(dtype: torch.dtype) -> None:
    """Maps in neither kernel layout (a channel slice of a qkv tensor, a permute) are made
    contiguous by the site and the folded site alike: equal bit for bit to each other and to
    the contiguous map's (before: each took ATen ops of its own, a few ulp apart)."""
    an = trained(AttentiveNorm(16, 4), dtype)
    folded = an.fuse()
    qkv = torch.randn(2, 48, 6, 5, dtype=dtype) * 10
    sliced = qkv[:, 16:32]
    permuted = torch.randn(2, 6, 16, 5, dtype=dtype).transpose(1, 2)
    with torch.no_grad():
        for x in (sliced, permuted):
            assert not x.is_contiguous()
            expected = an(x.contiguous())
            assert torch.equal(an(x), expected) and torch.equal(folded(x), expected)


def test_what_has_no_folded_form_stays() -> None:
    """``fuse()`` returns the module itself where there is nothing to fold."""
    for an in (
        AttentiveNorm(8, 3, pool="avgmax"),
        AttentiveNorm(8, 3, base="groupnorm", num_groups=2),
        AttentiveNorm(8, 3, track_running_stats=False),
    ):
        assert an.eval().fuse() is an


def test_low_precision_maps_and_autograd_take_the_folded_ops() -> None:
    """float16/bfloat16 maps, and maps autograd records through, take the folded ops (as on a
    GPU): outputs close to the module's, and its input gradient."""
    an = trained(AttentiveNorm(16, 4), torch.float32)
    folded = an.fuse()
    x = torch.randn(4, 16, 5, 5) * 2 + 1
    with torch.no_grad():
        for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
            y = folded(x.to(dtype))
            assert y.dtype == dtype
            torch.testing.assert_close(y.float(), an(x.to(dtype).float()), atol=tol, rtol=tol)
    xf, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, ya = folded(xf), _reference(an, xa)
    torch.testing.assert_close(yf, ya, **TOL[torch.float32])
    g = torch.randn_like(yf)
    yf.backward(g)
    ya.backward(g)
    torch.testing.assert_close(xf.grad, xa.grad, rtol=1e-4, atol=1e-5)


def test_inputs_of_every_rank_and_batch() -> None:
    """BatchNorm1d-based sites take (B, C) and (B, C, L); an empty batch gives an empty map; a
    map of another rank is refused as the BatchNorm would."""
    an = trained(AttentiveNorm(8, 3, base="batchnorm1d"), torch.float32, dims=1)
    folded = an.fuse()
    with torch.no_grad():
        for shape in ((5, 8), (5, 8, 7), (0, 8, 7)):
            x = torch.randn(shape)
            torch.testing.assert_close(folded(x), an(x), **TOL[torch.float32])
    with pytest.raises(ValueError, match="expected 2 or 3D input"):
        folded(torch.randn(2, 8, 3, 3))


def test_replaced_and_loaded_buffers_are_seen_and_edits_after_refresh() -> None:
    an = trained(AttentiveNorm(8, 3), torch.float32)
    other = trained(AttentiveNorm(8, 3), torch.float32)
    folded = an.fuse()
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(folded(x), an(x))
        folded.load_state_dict(other.fuse().state_dict())  # copied in place
        assert torch.equal(folded(x), other(x))
        folded.double()  # new buffers (float64 stay float64)
        assert torch.equal(folded(x.double()), copy.deepcopy(other).double()(x.double()))
        folded.float()  # the buffers keep the fold's float64: a cast would round it for good
        assert all(b.dtype == torch.float64 for b in folded.buffers())
        assert torch.equal(folded(x), other(x))
        folded.half().float()
        assert torch.equal(folded(x), other(x))
        folded.mix_a.mul_(2)  # an in-place edit: seen after refresh()
        before = folded(x)
        folded.refresh()
        assert not torch.allclose(folded(x), before)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (the map's size is traced)
def test_pickles_copies_and_traces() -> None:
    """torch.save/load and deepcopy keep the buffers, not what was derived from them (ctypes);
    torch.jit.trace and torch.export record the folded ops, which follow new inputs."""
    folded = trained(AttentiveNorm(8, 3), torch.float32).fuse()
    x, x2 = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        expected, expected2 = folded(x), folded(x2)
        buf = io.BytesIO()
        torch.save(folded, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(copy.deepcopy(folded)(x), expected)
        traced = torch.jit.trace(folded, x)
        exported = torch.export.export(folded, (x,)).module()
        for graph in (traced, exported):
            torch.testing.assert_close(graph(x2), expected2, **TOL[torch.float32])
    # traced with grad on (a model's maps require grad): trace's check re-traces under no_grad,
    # and the two graphs must be the same
    traced = torch.jit.trace(folded, x.clone().requires_grad_())
    torch.testing.assert_close(traced(x2), expected2, **TOL[torch.float32])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (the map's size is traced)
def test_a_traced_or_exported_site_takes_a_single_position_as_eager_does() -> None:
    """A 1x1 map (meanstd: variance 0 for one value) through a graph traced or exported on a
    5x5 one: the size stays an expression (before: the trace's n > 1 branch was baked in,
    and the unbiased variance of one value made every output NaN)."""
    folded = trained(AttentiveNorm(8, 4), torch.float32).fuse()
    one, example = torch.randn(2, 8, 1, 1), torch.randn(2, 8, 5, 5)
    dim = torch.export.Dim
    shapes = ({2: dim("h", min=1, max=64), 3: dim("w", min=1, max=64)},)
    tol = {torch.float32: TOL[torch.float32], torch.float16: {"atol": 2e-3, "rtol": 2e-3}}
    with torch.no_grad():
        for dtype in tol:  # (float16: moments of its own)
            one, example = one.to(dtype), example.to(dtype)
            expected = folded(one)
            assert expected.isfinite().all()
            traced = torch.jit.trace(folded, example)
            exported = torch.export.export(folded, (example,), dynamic_shapes=shapes).module()
            for graph in (traced, exported):
                torch.testing.assert_close(graph(one), expected, **tol[dtype])
                torch.testing.assert_close(graph(example), folded(example), **tol[dtype])


def test_a_first_call_under_inference_mode_leaves_autograd_calls_working() -> None:
    """What a call derives and keeps is made outside inference mode (before: inference tensors,
    which a later call that autograd records cannot save for backward)."""
    an = trained(AttentiveNorm(8, 4), torch.float32)
    folded = an.fuse()
    x = torch.randn(2, 8, 4, 4)
    with torch.inference_mode():
        first = folded(x)
    xg = x.clone().requires_grad_()
    y = folded(xg)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), first, **TOL[torch.float32])
    xr = x.clone().requires_grad_()
    _reference(an, xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", FOLDED_HEADS)
def test_a_training_site_folds_its_evaluation(head: str) -> None:
    """``fuse()`` of a site left in training mode folds what ``eval()`` would compute, for
    every head (before: heads with a BatchNorm1d stayed unfolded, the others folded) and
    leaves the site's modes as they were."""
    an = trained(AttentiveNorm(8, 4, head=head), torch.float32).train()
    folded = an.fuse()
    assert isinstance(folded, FoldedAttentiveNorm)
    assert all(m.training for m in an.modules())
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), an.eval()(x), **TOL[torch.float32])


def test_timm_reparameterize_model_folds_every_site() -> None:
    """``timm.utils.reparameterize_model`` (a copy) puts a FoldedAttentiveNorm at every site of a
    converted model, which then computes the model's evaluation; the original is untouched."""
    torch.manual_seed(0)
    base = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    model = convert(base, placement="all", cost=False).model
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x), model(x * 2)
    model.eval()
    deployed = timm.utils.reparameterize_model(model)
    sites = [m for m in model.modules() if isinstance(m, AttentiveNorm)]
    folded = [m for m in deployed.modules() if isinstance(m, FoldedAttentiveNorm)]
    assert len(folded) == len(sites) == 14
    assert not any(isinstance(m, AttentiveNorm) for m in deployed.modules())
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(deployed(x), expected)


def test_fold_sites_folds_inside_timm_reparameterizable_blocks() -> None:
    """RepVGG's blocks fuse their BatchNorms into convolutions (``reparameterize_model``), which
    an AN site in their place cannot follow; ``fold_sites`` folds the sites alone (a copy, or
    in place) and the model computes what it did, bit for bit."""
    torch.manual_seed(0)
    base = timm.create_model("repvgg_a0", pretrained=False, num_classes=10)
    model = convert(base, placement="all", init="preserve", cost=False).model
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x), model(x * 2)
    model.eval()
    sites = sum(isinstance(m, AttentiveNorm) for m in model.modules())
    folded = fold_sites(model)
    assert sum(isinstance(m, FoldedAttentiveNorm) for m in folded.modules()) == sites > 40
    assert not any(isinstance(m, AttentiveNorm) for m in folded.modules())
    assert sum(isinstance(m, AttentiveNorm) for m in model.modules()) == sites  # a copy
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all()
        assert torch.equal(folded(x), expected)
        assert fold_sites(model, inplace=True) is model
        assert torch.equal(model(x), expected)
    an = trained(AttentiveNorm(8, 3), torch.float32)
    assert isinstance(fold_sites(an), FoldedAttentiveNorm)  # a site alone
