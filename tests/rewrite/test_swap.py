"""Swapping norms for AttentiveNorm on the original module tree."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from an_search.errors import InvalidKError, UnknownNameError
from an_search.layers import AttentiveNorm
from an_search.rewrite import apply_an, find_sites, select_sites


def _added_params(channels: int, k: int) -> int:
    """Paper: 2KC (Gamma, Beta) + KC (W) + 2K (BN_K affine) - 2C (the BN's own affine)."""
    return 3 * k * channels + 2 * k - 2 * channels


def test_resnet50_paper_parameter_count() -> None:
    model = timm.create_model("resnet50", pretrained=False)
    base = sum(p.numel() for p in model.parameters())
    chosen = select_sites(find_sites(model), "paper")
    channels = {n: model.get_submodule(n).num_features for n in chosen}
    apply_an(model, chosen)
    total = sum(p.numel() for p in model.parameters())
    assert base == 25_557_032
    assert total == base + sum(_added_params(channels[n], k) for n, k in chosen.items())
    assert total == 25_755_420  # the paper's 25.76M
    assert all(isinstance(model.get_submodule(n), AttentiveNorm) for n in chosen)
    assert model.get_submodule("layer3.1.bn2").k == 20


def test_swap_keeps_timm_api_and_trains() -> None:
    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=7, drop_path_rate=0.2, zero_init_last=False
    )
    cfg = dict(model.pretrained_cfg)
    chosen = select_sites(find_sites(model), "paper")
    out = apply_an(model, chosen, init="paper")
    assert out is model and type(model).__name__ == "ResNet"
    assert model.pretrained_cfg == cfg and model.default_cfg == cfg
    x = torch.randn(2, 3, 64, 64)
    model.train()
    y = model(x)
    assert y.shape == (2, 7)
    y.sum().backward()
    grads = model.get_submodule("layer2.0.bn1").weight.grad
    assert grads is not None and grads.abs().sum() > 0
    # stochastic depth still depends on the mode: train outputs vary, eval outputs do not
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))
    assert model.forward_features(x).shape == (2, 512, 2, 2)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_preserve_init_keeps_function_and_activation() -> None:
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=5).eval()
    for m in model.modules():  # non-trivial running stats so "preserve" has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    chosen = select_sites(find_sites(model), "paper")
    apply_an(model, chosen, init="preserve")
    an = model.get_submodule("blocks.1.0.bn2")
    assert isinstance(an, AttentiveNorm) and isinstance(an.act, nn.ReLU6)  # BatchNormAct2d's act
    assert not an.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_no_weight_decay_names_mixture_parameters() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    apply_an(model, {"layer1.0.bn1": 4}, no_weight_decay=False)
    apply_an(model, {"layer2.0.bn1": 4}, no_weight_decay=True)
    assert model.no_weight_decay() == {"layer2.0.bn1.weight", "layer2.0.bn1.bias"}
    opt = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.layer1[0].bn1.weight) in decayed  # 2-D: decayed unless named
    assert id(model.layer2[0].bn1.weight) not in decayed
    clone = pickle.loads(pickle.dumps(model))
    assert clone.no_weight_decay() == model.no_weight_decay()


def test_no_weight_decay_extends_the_models_own() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    own = set(model.no_weight_decay())
    assert own
    apply_an(model, {"blocks.0.norm1": 3}, no_weight_decay=True)
    assert model.no_weight_decay() == own | {"blocks.0.norm1.weight", "blocks.0.norm1.bias"}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_bad_names_and_k_change_nothing() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    before = [type(m) for m in model.modules()]
    with pytest.raises(UnknownNameError, match="no module named 'layer9.bn1'"):
        apply_an(model, {"layer1.0.bn1": 4, "layer9.bn1": 4})
    with pytest.raises(UnknownNameError, match="not a norm"):
        apply_an(model, {"layer1.0.conv1": 4})
    with pytest.raises(InvalidKError):
        apply_an(model, {"layer1.0.bn1": 0})
    with pytest.raises(UnknownNameError):
        apply_an(model, {"layer1.0.bn1": 4}, head="no-such-head")
    assert [type(m) for m in model.modules()] == before
    an_model = apply_an(model, {"layer1.0.bn1": 4})
    with pytest.raises(UnknownNameError, match="not a norm"):
        apply_an(an_model, {"layer1.0.bn1": 4})  # already AN
    assert "layer1.0.bn1" not in {s.name for s in find_sites(an_model).sites}
    assert "layer1.0.bn1.norm" not in {s.name for s in find_sites(an_model).sites}
