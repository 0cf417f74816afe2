"""an_site_macs against what count_cost traces, and the re-exported parameter delta."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from an_search import layers
from an_search.cost import an_param_delta, an_site_macs, count_cost
from an_search.errors import UnknownNameError
from an_search.layers import HEADS, POOLS, AttentiveNorm

B, C, H, W, K, GROUPS = 2, 16, 5, 6, 3, 4
CHANNELS_LAST = ("layernorm", "rmsnorm")


def _traced(base: str, head: str, pool: str, spatial: tuple[int, ...] = (H, W)) -> int:
    an = AttentiveNorm(C, K, base=base, head=head, pool=pool, num_groups=GROUPS)
    shape = (*spatial, C) if base in CHANNELS_LAST else (C, *spatial)
    report = count_cost(nn.Sequential(an), shape, batch_size=B)
    assert report.unsupported_ops == {}  # every op AN runs has a handle
    return report.by_module["0"]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head(head: str) -> None:
    assert _traced("batchnorm", head, "meanstd") == an_site_macs(C, H * W, K, head, batch=B)


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_every_pool(pool: str) -> None:
    expected = an_site_macs(C, H * W, K, "mlp", pool, batch=B)
    assert _traced("batchnorm", "mlp", pool) == expected


@pytest.mark.parametrize(
    "base", ["groupnorm", "layernorm", "layernorm2d", "rmsnorm", "rmsnorm2d", "batchnorm3d"]
)
def test_every_base(base: str) -> None:
    spatial = (2, H, W) if base == "batchnorm3d" else (H, W)
    n = H * W * (2 if base == "batchnorm3d" else 1)
    expected = an_site_macs(C, n, K, "gn-hsigmoid", "avg", B, base=base, num_groups=GROUPS)
    assert _traced(base, "gn-hsigmoid", "avg", spatial) == expected


@pytest.mark.parametrize("pool", ["meanstd", "avgmax"])
def test_single_position(pool: str) -> None:
    # (B, C) input to a BatchNorm1d base: no variance over one position, no Bessel factor.
    assert _traced("batchnorm1d", "default", pool, ()) == an_site_macs(
        C, 1, K, pool=pool, batch=B, base="batchnorm1d"
    )


def test_default_site_formula() -> None:
    # Written out independently: moments 3, affine 2 per element; meanstd 4 and fold 3 per
    # (sample, channel); head C*K + 3K; mixing 2KC; running-var fold 2C once per batch.
    b, c, n, k = 4, 64, 56 * 56, 10
    expected = b * (5 * c * n + 7 * c + c * k + 3 * k + 2 * k * c) + 2 * c
    assert an_site_macs(c, n, k, batch=b) == expected
    assert an_site_macs(c, n, k, batch=b) > 2 * b * c * n  # the eval-mode affine BN it replaces


def test_batch_scaling() -> None:
    one = an_site_macs(C, H * W, K)
    assert an_site_macs(C, H * W, K, batch=3) == 3 * one - 2 * 2 * C  # fold of running var once


@pytest.mark.parametrize(
    "kwargs", [{"head": "nope"}, {"pool": "nope"}, {"base": "nope"}], ids=["head", "pool", "base"]
)
def test_unknown_names_raise(kwargs: dict[str, str]) -> None:
    with pytest.raises(UnknownNameError, match="nope"):
        an_site_macs(C, H * W, K, **kwargs)


def test_param_delta_is_the_layers_function() -> None:
    assert an_param_delta is layers.an_param_delta
    bn = nn.BatchNorm2d(C)
    assert an_param_delta(bn, K) == 3 * K * C + 2 * K - 2 * C
    an = AttentiveNorm.from_norm(bn, K)
    own = sum(p.numel() for p in an.parameters()) - sum(p.numel() for p in bn.parameters())
    assert own == an_param_delta(bn, K)
    assert torch.is_tensor(an.weight)
