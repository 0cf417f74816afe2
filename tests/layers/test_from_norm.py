"""AttentiveNorm.from_norm for every supported norm class, and the norm registry."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from timm import layers as tl
from timm.layers.evo_norm import EvoNorm2dB0
from timm.layers.filter_response_norm import FilterResponseNormTlu2d
from timm.layers.norm import LayerNormExp2d
from timm.models import metaformer
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from an_search.errors import UnknownNameError
from an_search.layers import (
    NORM_CLASSES,
    SUPPORTED_NORM_CLASSES,
    AttentiveNorm,
    an_param_delta,
    is_supported_norm,
    norm_kind,
)

C, K = 8, 3
NCHW, TOKENS, FLAT = (4, C, 5, 5), (4, 6, C), (6, C)


def _sync_bn_act() -> nn.Module:
    return tl.convert_sync_batchnorm(tl.BatchNormAct2d(C, act_layer=nn.SiLU))


# name -> (factory, input shape, expected base, learnable affine params of the original norm)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str, int]] = {
    "BatchNorm1d": (lambda: nn.BatchNorm1d(C), (4, C, 7), "batchnorm1d", 2 * C),
    "BatchNorm1d-flat": (lambda: nn.BatchNorm1d(C), FLAT, "batchnorm1d", 2 * C),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(C), NCHW, "batchnorm", 2 * C),
    "BatchNorm2d-no-affine": (lambda: nn.BatchNorm2d(C, affine=False), NCHW, "batchnorm", 0),
    "BatchNorm2d-no-stats": (
        lambda: nn.BatchNorm2d(C, track_running_stats=False),
        NCHW,
        "batchnorm",
        2 * C,
    ),
    "BatchNorm2d-cumulative": (lambda: nn.BatchNorm2d(C, momentum=None), NCHW, "batchnorm", 2 * C),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(C), (3, C, 2, 3, 3), "batchnorm3d", 2 * C),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(C), NCHW, "batchnorm", 2 * C),
    "BatchNormAct2d": (lambda: tl.BatchNormAct2d(C), NCHW, "batchnorm", 2 * C),
    "SyncBatchNormAct": (_sync_bn_act, NCHW, "batchnorm", 2 * C),
    "FrozenBatchNorm2d": (lambda: FrozenBatchNorm2d(C), NCHW, "batchnorm", 0),
    "FrozenBatchNormAct2d": (lambda: tl.FrozenBatchNormAct2d(C), NCHW, "batchnorm", 0),
    "nn.GroupNorm": (lambda: nn.GroupNorm(4, C), NCHW, "groupnorm", 2 * C),
    "GroupNorm": (lambda: tl.GroupNorm(C, num_groups=2), NCHW, "groupnorm", 2 * C),
    "GroupNorm1": (lambda: tl.GroupNorm1(C), NCHW, "groupnorm", 2 * C),
    "GroupNormAct": (
        lambda: tl.GroupNormAct(C, num_groups=4, act_layer=nn.GELU),
        NCHW,
        "groupnorm",
        2 * C,
    ),
    "GroupNorm1Act": (lambda: tl.GroupNorm1Act(C), NCHW, "groupnorm", 2 * C),
    "GroupNorm1NoBias": (lambda: metaformer.GroupNorm1NoBias(C), NCHW, "groupnorm", C),
    "LayerNorm2dNoBias": (lambda: metaformer.LayerNorm2dNoBias(C), NCHW, "layernorm2d", C),
    "LayerNormNoBias": (lambda: metaformer.LayerNormNoBias(C), TOKENS, "layernorm", C),
    "nn.LayerNorm": (lambda: nn.LayerNorm(C), TOKENS, "layernorm", 2 * C),
    "nn.LayerNorm-no-bias": (lambda: nn.LayerNorm(C, bias=False), (4, 3, 3, C), "layernorm", C),
    "nn.LayerNorm-no-affine": (
        lambda: nn.LayerNorm(C, elementwise_affine=False),
        TOKENS,
        "layernorm",
        0,
    ),
    "LayerNorm": (lambda: tl.LayerNorm(C), TOKENS, "layernorm", 2 * C),
    "LayerNormFp32": (lambda: tl.LayerNormFp32(C), TOKENS, "layernorm", 2 * C),
    "LayerNormAct": (lambda: tl.LayerNormAct(C), TOKENS, "layernorm", 2 * C),
    "LayerNormActFp32": (lambda: tl.LayerNormActFp32(C), TOKENS, "layernorm", 2 * C),
    "LayerNorm2d": (lambda: tl.LayerNorm2d(C), NCHW, "layernorm2d", 2 * C),
    "LayerNorm2dFp32": (lambda: tl.LayerNorm2dFp32(C), NCHW, "layernorm2d", 2 * C),
    "LayerNormExp2d": (lambda: LayerNormExp2d(C), NCHW, "layernorm2d", 2 * C),
    "LayerNormAct2d": (lambda: tl.LayerNormAct2d(C), NCHW, "layernorm2d", 2 * C),
    "LayerNormAct2dFp32": (lambda: tl.LayerNormAct2dFp32(C), NCHW, "layernorm2d", 2 * C),
    "nn.RMSNorm": (lambda: nn.RMSNorm(C), TOKENS, "rmsnorm", C),
    "RmsNorm": (lambda: tl.RmsNorm(C), TOKENS, "rmsnorm", C),
    "RmsNormFp32": (lambda: tl.RmsNormFp32(C), TOKENS, "rmsnorm", C),
    "RmsNormAct": (lambda: tl.RmsNormAct(C), TOKENS, "rmsnorm", C),
    "RmsNormActFp32": (lambda: tl.RmsNormActFp32(C), TOKENS, "rmsnorm", C),
    "RmsNorm2d": (lambda: tl.RmsNorm2d(C), NCHW, "rmsnorm2d", C),
    "RmsNorm2dFp32": (lambda: tl.RmsNorm2dFp32(C), NCHW, "rmsnorm2d", C),
    "RmsNormAct2d": (lambda: tl.RmsNormAct2d(C), NCHW, "rmsnorm2d", C),
    "RmsNormAct2dFp32": (lambda: tl.RmsNormAct2dFp32(C), NCHW, "rmsnorm2d", C),
}


def _randomized(factory: Callable[[], nn.Module]) -> nn.Module:
    """The norm with non-trivial affine parameters and running statistics."""
    norm = factory()
    with torch.no_grad():
        for name, t in [*norm.named_parameters(), *norm.named_buffers()]:
            if name in ("weight", "bias", "running_mean"):
                t.copy_(torch.randn_like(t) * 0.5 + (1.0 if name == "weight" else 0.0))
            elif name == "running_var":
                t.uniform_(0.5, 2.0)
    return norm


def test_every_supported_class_has_a_case() -> None:
    covered = {type(factory()) for factory, *_ in CASES.values()}
    assert covered == set(SUPPORTED_NORM_CLASSES)


@pytest.mark.parametrize("case", sorted(CASES))
class TestFromNorm:
    def test_kind_and_support(self, case: str) -> None:
        factory, _, base, _ = CASES[case]
        norm = factory()
        assert norm_kind(norm) == base and is_supported_norm(norm)
        an = AttentiveNorm.from_norm(norm, K)
        assert an.base == base and an.k == K and an.num_features == C
        assert an.weight.shape == an.bias.shape == (K, C)
        assert not isinstance(an, type(norm))  # composite, never a subclass of the norm

    def test_preserve_matches_original(self, case: str) -> None:
        factory, shape, _, _ = CASES[case]
        x = torch.randn(shape) * 1.5 + 0.5
        for training in (False, True):
            norm = _randomized(factory).train(training)
            expected = copy.deepcopy(norm)(x)
            an = AttentiveNorm.from_norm(copy.deepcopy(norm), K, init="preserve")
            assert an.training == training
            torch.testing.assert_close(an(x), expected, atol=3e-5, rtol=1e-4, msg=f"{training=}")
        if getattr(norm, "running_mean", None) is not None and "Frozen" not in case:
            norm(x)  # one train step of the original moves its running statistics like the AN's
            torch.testing.assert_close(an.norm.running_mean, norm.running_mean)
            torch.testing.assert_close(an.norm.running_var, norm.running_var)
            assert int(an.norm.num_batches_tracked) == int(norm.num_batches_tracked)

    def test_keeps_drop_and_act(self, case: str) -> None:
        norm = CASES[case][0]()
        an = AttentiveNorm.from_norm(norm, K)
        if hasattr(norm, "act"):
            assert an.act is norm.act and an.drop is norm.drop
        else:
            assert isinstance(an.act, nn.Identity) and isinstance(an.drop, nn.Identity)

    def test_param_delta(self, case: str) -> None:
        factory, _, _, affine = CASES[case]
        norm = factory()
        an = AttentiveNorm.from_norm(norm, K)
        measured = sum(p.numel() for p in an.parameters()) - sum(
            p.numel() for p in norm.parameters()
        )
        expected = 3 * K * C + 2 * K - affine  # default head: Gamma, Beta, W (KC) + BN_K (2K)
        assert measured == expected == an_param_delta(norm, K, "default")


def test_frozen_batchnorm_uses_running_stats_in_training() -> None:
    norm = _randomized(lambda: FrozenBatchNorm2d(C))
    an = AttentiveNorm.from_norm(norm, K, init="preserve").train()
    x = torch.randn(NCHW) + 1.0
    before = an.norm.running_mean.clone()
    torch.testing.assert_close(an(x), norm(x), atol=3e-5, rtol=1e-4)
    assert torch.equal(an.norm.running_mean, before)


def test_from_norm_follows_dtype() -> None:
    an = AttentiveNorm.from_norm(nn.BatchNorm2d(C).double(), K)
    assert an.weight.dtype == torch.float64 and an.norm.running_mean.dtype == torch.float64


class _MyBatchNorm(nn.BatchNorm2d):
    """A subclass may add behaviour a swap would lose: never converted."""


@pytest.mark.parametrize(
    "norm",
    [
        EvoNorm2dB0(C),
        FilterResponseNormTlu2d(C),
        tl.SplitBatchNorm2d(C, num_splits=2),
        nn.InstanceNorm2d(C),
        nn.LayerNorm((5, C)),
        _MyBatchNorm(C),
        AttentiveNorm(C, K),
        nn.Conv2d(C, C, 1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_norms(norm: nn.Module) -> None:
    assert norm_kind(norm) is None and not is_supported_norm(norm)
    with pytest.raises(UnknownNameError, match="BatchNormAct2d"):
        AttentiveNorm.from_norm(norm, K)
    with pytest.raises(UnknownNameError):
        an_param_delta(norm, K)


def test_norm_classes_cover_supported_unsupported_and_attentive_norm() -> None:
    assert set(SUPPORTED_NORM_CLASSES) <= set(NORM_CLASSES)
    for cls in (EvoNorm2dB0, FilterResponseNormTlu2d, tl.SplitBatchNorm2d, AttentiveNorm):
        assert cls in NORM_CLASSES
    assert nn.Conv2d not in NORM_CLASSES


def test_paper_init_keeps_timms_zero_init_last_at_zero() -> None:
    """A zero-initialised last norm of a residual block starts its branch at zero (Gamma = Beta
    = 0); any other norm gets the paper's Gamma ~ N(1, 0.1), Beta ~ N(0, 0.1)."""
    import timm

    from an_search import convert

    torch.manual_seed(0)
    model = convert("resnet18", placement="all", init="paper").model
    block = model.layer1[0]
    assert isinstance(block.bn2, AttentiveNorm) and isinstance(block.bn1, AttentiveNorm)
    assert not block.bn2.weight.any() and not block.bn2.bias.any()
    assert abs(block.bn1.weight.mean().item() - 1.0) < 0.1 and block.bn1.bias.abs().max() > 0
    x = torch.randn(2, 64, 16, 16)
    for mode in (True, False):  # the block is its shortcut at init: act(0 + x)
        torch.testing.assert_close(block.train(mode)(x), torch.relu(x), rtol=0, atol=0)

    plain = timm.create_model("resnet18", zero_init_last=False)
    an = AttentiveNorm.from_norm(plain.layer1[0].bn2, K, init="paper")
    assert abs(an.weight.mean().item() - 1.0) < 0.1  # not zero-initialised: the paper's init
