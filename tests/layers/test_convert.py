"""SyncBatchNorm conversion, weight-decay names and the analytic delta on site records."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn

from an_search.layers import (
    AttentiveNorm,
    an_param_delta,
    convert_sync_batchnorm,
    no_weight_decay_names,
)

C, K = 8, 3


def _tiny_resnet_with_an() -> nn.Module:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    block = model.layer1[0]
    block.bn2 = AttentiveNorm.from_norm(block.bn2, K, init="preserve")
    model.layer2[0].bn1 = AttentiveNorm.from_norm(model.layer2[0].bn1, K)
    return model


@pytest.mark.parametrize(
    "convert",
    [convert_sync_batchnorm, nn.SyncBatchNorm.convert_sync_batchnorm],
    ids=["an_search", "torch"],
)
def test_sync_batchnorm_conversion_keeps_mixture_and_converts_inner_norm(convert) -> None:
    model = _tiny_resnet_with_an().train()
    an = model.layer1[0].bn2
    kept = {name: p for name, p in an.named_parameters() if not name.startswith("norm")}
    values = {name: p.detach().clone() for name, p in kept.items()}
    running_mean = an.norm.running_mean.clone()
    converted = convert(model)
    an_after = converted.layer1[0].bn2
    assert an_after is an  # the composite survives; only its children are rebuilt
    assert type(an.norm) is nn.SyncBatchNorm and not an.norm.affine
    assert torch.equal(an.norm.running_mean, running_mean)
    for name, p in an.named_parameters():
        if name in kept:
            assert p is kept[name] and torch.equal(p, values[name]), name
    assert isinstance(converted.bn1, nn.SyncBatchNorm)  # plain BNs converted too
    y = converted(torch.randn(2, 3, 32, 32))  # no process group: SyncBatchNorm runs locally
    assert y.shape == (2, 5)


def test_sync_inner_norm_takes_reference_path_and_matches_fused() -> None:
    an = AttentiveNorm(C, K).double().train()
    synced = convert_sync_batchnorm(AttentiveNorm(C, K).double().train())
    synced.load_state_dict(an.state_dict())
    assert isinstance(synced.norm, nn.SyncBatchNorm)
    assert not synced._can_fuse(torch.randn(2, C, 3, 3))
    x = torch.randn(4, C, 5, 5, dtype=torch.double)
    torch.testing.assert_close(synced(x), an(x))
    torch.testing.assert_close(synced.norm.running_var, an.norm.running_var)


def test_no_weight_decay_names_lists_mixture_parameters_only() -> None:
    model = _tiny_resnet_with_an()
    names = no_weight_decay_names(model)
    assert names == {
        "layer1.0.bn2.weight",
        "layer1.0.bn2.bias",
        "layer2.0.bn1.weight",
        "layer2.0.bn1.bias",
    }
    params = dict(model.named_parameters())
    assert all(params[n].shape == (K, params[n].shape[1]) for n in names)
    assert no_weight_decay_names(AttentiveNorm(C, K)) == {"weight", "bias"}


@dataclass(frozen=True)
class _Site:  # the fields an_search.rewrite.Site shares with the analytic delta
    channels: int
    base: str
    affine: bool


@pytest.mark.parametrize(
    "site,head,expected",
    [
        (_Site(C, "batchnorm", True), "default", 3 * K * C + 2 * K - 2 * C),
        (_Site(C, "batchnorm", False), "default", 3 * K * C + 2 * K),
        (_Site(C, "rmsnorm", True), "linear-sigmoid", 3 * K * C + K - C),
        (_Site(C, "groupnorm", True), "mlp", 2 * K * C + 2 * K * C + 2 * K + 2 * K * K + K - 2 * C),
    ],
)
def test_param_delta_of_site_records(site: _Site, head: str, expected: int) -> None:
    assert an_param_delta(site, K, head) == expected


def test_paper_resnet50_parameter_count() -> None:
    """AN_PAPER.md: resnet50 with AN at every bottleneck bn2, K = 10/10/20/20 -> 25,755,420."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model("resnet50", pretrained=False)
    ks = {"layer1": 10, "layer2": 10, "layer3": 20, "layer4": 20}
    delta = sum(
        an_param_delta(block.bn2, k) for stage, k in ks.items() for block in getattr(model, stage)
    )
    assert sum(p.numel() for p in model.parameters()) + delta == 25_755_420
