"""Contract tests for the attention-head and pooled-statistic registries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from an_search.errors import UnknownNameError
from an_search.layers import HEADS, POOLS, create_head, create_pool, head_param_count

C, K, B = 12, 5, 6

# Learnable parameters per head, written from AN_PAPER.md's table (independent of the code).
EXPECTED_PARAMS = {
    "default": lambda c, k: k * c + 2 * k,  # W, BN_K affine
    "linear-sigmoid": lambda c, k: k * c + k,  # W, bias
    "linear-hsigmoid": lambda c, k: k * c + k,
    "bn-sigmoid": lambda c, k: k * c + 2 * k,
    "bn-softmax": lambda c, k: k * c + 2 * k,
    "gn-hsigmoid": lambda c, k: k * c + 2 * k,  # GroupNorm(1, K) affine
    "mlp": lambda c, k: (2 * k * c + 2 * k) + (2 * k * k + k),
    "mlp-bn": lambda c, k: (2 * k * c + 4 * k) + (2 * k * k + 2 * k),
}


def _hsig(z: torch.Tensor) -> torch.Tensor:
    return torch.clamp(z + 3.0, 0.0, 6.0) / 6.0


def _bn_train(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def _gn1(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def _formula(name: str, head: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """Train-mode head output from AN_PAPER.md's table, using the head's weights."""
    lin = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if name.startswith("mlp"):
        h = F.linear(s, lin[0].weight, lin[0].bias)
        h = torch.relu(_bn_train(h) if name == "mlp-bn" else h)
        z = F.linear(h, lin[1].weight, lin[1].bias)
        return _hsig(_bn_train(z)) if name == "mlp-bn" else torch.sigmoid(z)
    z = F.linear(s, lin[0].weight, lin[0].bias)
    if name in ("default", "bn-sigmoid", "bn-softmax"):
        z = _bn_train(z)
    elif name == "gn-hsigmoid":
        z = _gn1(z)
    if name.endswith("softmax"):
        return torch.softmax(z, 1)
    return torch.sigmoid(z) if name.endswith("-sigmoid") or name == "mlp" else _hsig(z)


def test_registry_lists_every_paper_head() -> None:
    assert set(HEADS) == set(EXPECTED_PARAMS)
    assert set(POOLS) == {"meanstd", "avg", "avgmax"}


@pytest.mark.parametrize("name", sorted(HEADS))
class TestHeadContract:
    def test_output_shape_and_range(self, name: str) -> None:
        head = create_head(name, C, K)
        out = head(torch.randn(B, C))
        assert out.shape == (B, K)
        assert bool(((out >= 0) & (out <= 1)).all())
        if name == "bn-softmax":
            torch.testing.assert_close(out.sum(1), torch.ones(B))

    def test_matches_paper_formula(self, name: str) -> None:
        head = create_head(name, C, K).train().double()
        s = torch.randn(B, C, dtype=torch.double)
        torch.testing.assert_close(head(s), _formula(name, head, s))

    def test_param_count(self, name: str) -> None:
        head = create_head(name, C, K)
        measured = sum(p.numel() for p in head.parameters())
        assert measured == EXPECTED_PARAMS[name](C, K) == head_param_count(name, C, K)

    def test_paper_init(self, name: str) -> None:
        head = create_head(name, 256, 64)
        for m in head.modules():
            if isinstance(m, nn.Linear):
                expected_std = (2.0 / m.out_features) ** 0.5  # Kaiming normal, fan_out, relu
                assert abs(m.weight.std().item() / expected_std - 1.0) < 0.1
                assert m.bias is None or bool((m.bias == 0).all())
            if isinstance(m, (nn.BatchNorm1d, nn.GroupNorm)):
                assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())

    def test_last_linear_produces_k_logits(self, name: str) -> None:
        assert create_head(name, C, K).last_linear().out_features == K


def test_unknown_head_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="bn-softmax"):
        create_head("nope", C, K)
    with pytest.raises(UnknownNameError, match="default"):
        head_param_count("nope", C, K)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", sorted(POOLS))
def test_pool_matches_formula(name: str, channels_last: bool) -> None:
    x = torch.randn(3, 4, 5, 6, dtype=torch.double) * 2 + 0.5  # (B, C, H, W)
    xin = x.permute(0, 2, 3, 1) if channels_last else x  # (B, H, W, C)
    mean = x.mean((2, 3))
    expected = {
        "meanstd": mean / torch.sqrt(x.var((2, 3), unbiased=True) + 1e-3),
        "avg": mean,
        "avgmax": 0.5 * (mean + x.amax((2, 3))),
    }[name]
    torch.testing.assert_close(create_pool(name, channels_last)(xin), expected)


def test_meanstd_single_position_has_zero_variance() -> None:
    x = torch.randn(3, 4, 1)
    torch.testing.assert_close(create_pool("meanstd")(x), x[..., 0] / 1e-3**0.5)


def test_unknown_pool_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="meanstd"):
        create_pool("median")
