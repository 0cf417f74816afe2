"""count_cost on timm models with some norms swapped for AttentiveNorm by hand."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from an_search.cost import count_cost
from an_search.layers import HEADS, POOLS, AttentiveNorm

BATCH = 2
INPUT = (3, 32, 32)
SITES = {"layer1.0.bn1": 3, "layer2.1.bn2": 5}  # resnet18 site -> K
HEADS_, POOLS_ = list(HEADS), list(POOLS)


def _convert(model: nn.Module, site_k: dict[str, int], **kwargs: str) -> nn.Module:
    for name, k in site_k.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, AttentiveNorm.from_norm(getattr(owner, child), k, **kwargs))
    return model


def _input_shapes(model: nn.Module, names: list[str], input_size: tuple[int, ...]) -> dict:
    """Shape of the tensor each named module receives, from a real forward."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))
        )
        for name in names
    ]
    with torch.no_grad():
        model.eval()(torch.randn(BATCH, *input_size))
    for h in handles:
        h.remove()
    return shapes


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def _an_default_macs(b: int, c: int, n: int, k: int) -> int:
    """Eval-mode AN (BN base, default head, meanstd pool), op by op as the layer runs them."""
    moments = 3 * b * c * n  # sum x, x * x, sum -> per-channel mean and variance
    meanstd = 4 * b * c  # var * n/(n-1), + eps, rsqrt, mean * rsqrt
    head = b * c * k + 2 * b * k + b * k  # linear (no bias), eval BN_K with affine, hard-sigmoid
    mixing = 2 * b * k * c  # lam @ Gamma, lam @ Beta
    fold = 2 * c + 3 * b * c  # running var + eps, rsqrt (C,); scale = gamma * r, beta - scale*mean
    affine = 2 * b * c * n  # one pass x * a + t, counted like eval BN
    return moments + meanstd + head + mixing + fold + affine


@pytest.fixture(scope="module")
def before():
    return count_cost(_resnet18(), INPUT, batch_size=BATCH)


@pytest.fixture(scope="module")
def converted() -> nn.Module:
    return _convert(_resnet18(), SITES)


@pytest.fixture(scope="module")
def after(converted: nn.Module):
    return count_cost(converted, INPUT, batch_size=BATCH)


def test_macs_delta_matches_formula(converted: nn.Module, before, after) -> None:
    shapes = _input_shapes(converted, list(SITES), INPUT)
    expected = 0
    for name, k in SITES.items():
        b, c, h, w = shapes[name]
        bn = 2 * b * c * h * w  # what fvcore counts for the eval-mode affine BN replaced
        expected += _an_default_macs(b, c, h * w, k) - bn
    assert after.macs - before.macs == expected


def test_by_module_lists_sites_with_their_cost(converted: nn.Module, after) -> None:
    shapes = _input_shapes(converted, list(SITES), INPUT)
    assert list(after.by_module) == list(SITES)
    for name, k in SITES.items():
        b, c, h, w = shapes[name]
        assert after.by_module[name] == _an_default_macs(b, c, h * w, k)
    assert after.an_macs == sum(after.by_module.values())


def test_params_delta_matches_paper_formula(converted: nn.Module, before, after) -> None:
    channels = {name: converted.get_submodule(name).num_features for name in SITES}
    expected = sum(3 * k * channels[n] + 2 * k - 2 * channels[n] for n, k in SITES.items())
    assert after.params - before.params == expected
    assert after.params == sum(p.numel() for p in converted.parameters())


def test_an_adds_no_unsupported_ops(before, after) -> None:
    assert after.unsupported_ops == before.unsupported_ops  # residual add_ and max_pool only


def test_flop_counter_cross_check(before, after) -> None:
    for report in (before, after):
        matmul_like = sum(
            report.by_operator.get(op, 0) for op in ("conv", "linear", "addmm", "matmul")
        )
        assert report.flop_counter_macs == pytest.approx(matmul_like, rel=0.01)
        assert report.flop_counter_macs < report.macs
    assert after.flop_counter_macs > before.flop_counter_macs  # AN's head and mixing matmuls


def test_an_never_cheaper_than_bn_for_any_head_or_pool() -> None:
    # One resnet18, one site per head (pools cycled): one trace covers every variant.
    model = _resnet18()
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    sites = bns[1 : 1 + len(HEADS_)]
    variants = {
        name: (head, POOLS_[i % len(POOLS_)])
        for i, (name, head) in enumerate(zip(sites, HEADS_, strict=True))
    }
    shapes = _input_shapes(model, list(variants), INPUT)
    for name, (head, pool) in variants.items():
        _convert(model, {name: 4}, head=head, pool=pool)
    before_bns = {name: 2 * math.prod(shapes[name]) for name in variants}  # eval affine BN
    report = count_cost(model, INPUT, batch_size=BATCH)
    assert {pool for _, pool in variants.values()} == set(POOLS)
    assert [head for head, _ in variants.values()] == HEADS_
    for name, (head, pool) in variants.items():
        assert report.by_module[name] > before_bns[name], (head, pool)


def test_activation_of_act_norm_stays_stock() -> None:
    # timm BatchNormAct2d sites: the AN keeps their activation, which fvcore does not count
    # (relu is ignored, hardswish unsupported); it must stay so inside the AN.
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5)
    sites = {"bn1": 3, "blocks.1.0.bn1": 4}  # Hardswish and ReLU activations
    shapes = _input_shapes(model, list(sites), (3, 32, 32))
    before = count_cost(model, (3, 32, 32), batch_size=BATCH)
    _convert(model, sites)
    assert type(model.bn1.act).__name__ == "Hardswish"
    after = count_cost(model, (3, 32, 32), batch_size=BATCH)
    assert after.unsupported_ops == before.unsupported_ops
    for name, k in sites.items():
        b, c, h, w = shapes[name]
        assert after.by_module[name] == _an_default_macs(b, c, h * w, k)


def test_train_mode_model_is_counted_in_eval_and_restored(converted: nn.Module, after) -> None:
    converted.train()
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    report = count_cost(converted, INPUT, batch_size=BATCH)
    assert report.macs == after.macs
    assert converted.training
    assert all(m.training for m in converted.modules())
    assert all(torch.equal(state[k], v) for k, v in converted.state_dict().items())


@pytest.mark.slow  # two resnet50 traces at 224x224
def test_resnet50_paper_placement() -> None:
    model = timm.create_model("resnet50", pretrained=False)
    before = count_cost(model)
    stage_k = {1: 10, 2: 10, 3: 20, 4: 20}
    sites = {
        f"layer{s}.{i}.bn2": k
        for s, k in stage_k.items()
        for i in range(len(model.get_submodule(f"layer{s}")))
    }
    after = count_cost(_convert(model, sites))
    assert before.params == 25_557_032
    assert after.params == 25_755_420  # the paper's 25.76M
    assert after.macs > before.macs
    assert after.macs == pytest.approx(4.1e9, rel=0.01)
    assert len(after.by_module) == 16


def test_a_deployed_model_counts_as_the_an_model_it_folds(
    converted: nn.Module, before, after
) -> None:
    """``fold_sites`` (a ``FoldedAttentiveNorm`` at each site, its weights buffers): its sites
    are AN scopes (their statistics, head and affine counted, nothing unsupported added) and
    its parameters are those of the sites it folds, never under the model it replaced."""
    from an_search import fold_sites

    deployed = fold_sites(converted.eval())
    assert sum(p.numel() for p in deployed.parameters()) < before.params  # (what was counted)
    report = count_cost(deployed, INPUT, batch_size=BATCH)
    assert report.params == after.params
    assert report.unsupported_ops == before.unsupported_ops
    assert list(report.by_module) == list(SITES)
    shapes = _input_shapes(converted, list(SITES), INPUT)
    for name in SITES:  # at least a statistics pass and the affine: more than the eval BN
        assert report.by_module[name] > 2 * math.prod(shapes[name])
    assert report.macs > before.macs
