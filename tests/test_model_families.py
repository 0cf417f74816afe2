"""Whole-model checks on real timm models of every norm family timm uses (``placement all``).

For each model: every supported norm becomes AN (default head, K=3, init ``preserve``); the
eval output equals the unconverted model's (float64, so rounding cannot hide a wrong formula);
the parameter delta equals 3KC + 2K minus the replaced affine parameters, summed over sites; a
training step reaches the mixture and head parameters; and save -> load reproduces outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import timm
import timm.layers as tl
import torch
from timm.models import metaformer
from torch import nn

from an_search.layers import AttentiveNorm
from an_search.rewrite import Recipe, apply_an, find_sites, load, save, select_sites

K = 3
# name -> (builder, the norm classes it must contain, input side)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[type, ...], int]] = {
    "resnet18": (lambda: timm.create_model("resnet18"), (nn.BatchNorm2d,), 32),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), (tl.BatchNormAct2d,), 32),
    "mobilenetv2_100": (lambda: timm.create_model("mobilenetv2_100"), (tl.BatchNormAct2d,), 32),
    "convnext_atto": (
        lambda: timm.create_model("convnext_atto"),
        (tl.LayerNorm2d, tl.LayerNorm),
        32,
    ),
    "vit_tiny_patch16_224": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2),
        (tl.LayerNorm, nn.LayerNorm),
        32,
    ),
    "resnetv2_50x1_bit (GroupNormAct)": (
        lambda: timm.create_model("resnetv2_50x1_bit"),
        (tl.GroupNormAct,),
        32,
    ),
    "resnet10t with GroupNorm": (
        lambda: timm.create_model("resnet10t", norm_layer=partial(tl.GroupNorm, num_groups=8)),
        (tl.GroupNorm,),
        32,
    ),
    "efficientnet_b0 with LayerNormAct2d": (
        lambda: timm.create_model("efficientnet_b0", norm_layer=tl.LayerNormAct2d),
        (tl.LayerNormAct2d,),
        32,
    ),
    "convnext_atto_rms (RmsNorm)": (
        lambda: timm.create_model("convnext_atto_rms"),
        (tl.RmsNorm2d, tl.RmsNorm),
        32,
    ),
    "poolformerv2_s12 (MetaFormer v2: GroupNorm1NoBias)": (
        lambda: timm.create_model("poolformerv2_s12"),
        (metaformer.GroupNorm1NoBias,),
        64,  # (at 32 px stage 3 is 1 x 1, where pool(x) - x is 0: its norm1 gets no gradient)
    ),
    "convformer_s18 (LayerNorm2dNoBias, LayerNormNoBias)": (
        lambda: timm.create_model("convformer_s18"),
        (metaformer.LayerNorm2dNoBias, metaformer.LayerNormNoBias),
        32,
    ),
    "vit with RmsNorm": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, depth=2, norm_layer=tl.RmsNorm
        ),
        (tl.RmsNorm,),
        32,
    ),
}


def _randomize_norms(model: nn.Module, names: set[str]) -> None:
    """Non-trivial affine and running stats (timm zero-inits some last-in-block norms)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name not in names:
                continue
            for attr, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.2, 0.2), ("running_mean",
                -0.2, 0.2), ("running_var", 0.5, 2.0)):  # fmt: skip
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo)


def _affine_numel(module: nn.Module) -> int:
    return sum(
        p.numel()
        for name in ("weight", "bias")
        if isinstance(p := getattr(module, name, None), nn.Parameter)
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_all_sites_preserve_params_and_train(name: str) -> None:
    build, families, side = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    kinds = {type(m) for m in model.modules()}
    assert any(f in kinds for f in families), f"{name} lacks {families}: test is stale"

    report = find_sites(model)
    site_k = select_sites(report, "all", k=K)
    _randomize_norms(model, set(site_k))
    modules = dict(model.named_modules())
    assert set(site_k) == {s.name for s in report.sites if s.supported}
    assert {type(modules[n]) for n in site_k} & set(families)  # the family's norms convert
    expected_delta = sum(
        3 * K * s.channels + 2 * K - _affine_numel(modules[s.name]) for s in report.sites
        if s.name in site_k
    )  # fmt: skip
    params_before = sum(p.numel() for p in model.parameters())

    converted = apply_an(copy.deepcopy(model), site_k, init="preserve").eval()
    params_after = sum(p.numel() for p in converted.parameters())
    assert params_after - params_before == expected_delta
    ans = [m for m in converted.modules() if isinstance(m, AttentiveNorm)]
    assert len(ans) == len(site_k)

    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), converted(x)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7 * ref.abs().max().item())

    converted.train()
    converted(x).square().mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in ans)
    heads_with_grad = sum(
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.attn.parameters()) for m in ans
    )
    assert heads_with_grad == len(ans)


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"])
def test_save_reload_identical(name: str, tmp_path: Path) -> None:
    kwargs = {"img_size": 32, "depth": 2} if name.startswith("vit") else {}
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    site_k = select_sites(find_sites(model), "all", k=K)
    apply_an(model, site_k, head="mlp", pool="avgmax")
    recipe = Recipe.from_selection(
        model=name, selected=site_k, model_kwargs=kwargs, head="mlp", pool="avgmax"
    )
    save(model, recipe, tmp_path / "m")
    again, _ = load(tmp_path / "m")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# Head parameters for C channels and K components, from AN_PAPER.md's table (written out here,
# independently of an_search.layers.head_param_count).
HEAD_PARAMS: dict[str, Callable[[int, int], int]] = {
    "default": lambda c, k: k * c + 2 * k,  # W (no bias) + BN_K affine
    "linear-sigmoid": lambda c, k: k * c + k,
    "linear-hsigmoid": lambda c, k: k * c + k,
    "bn-sigmoid": lambda c, k: k * c + 2 * k,
    "bn-softmax": lambda c, k: k * c + 2 * k,
    "gn-hsigmoid": lambda c, k: k * c + 2 * k,  # GroupNorm(1, K) affine
    "mlp": lambda c, k: c * 2 * k + 2 * k + 2 * k * k + k,
    "mlp-bn": lambda c, k: c * 2 * k + 2 * (2 * k) + 2 * k * k + 2 * k,
}


@pytest.mark.parametrize("head", list(HEAD_PARAMS))
@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto"])
def test_every_head_param_delta_on_real_models(name: str, head: str) -> None:
    from an_search.layers import HEADS

    assert set(HEADS) == set(HEAD_PARAMS), "a head without a formula here"
    model = timm.create_model(name)
    report = find_sites(model)
    site_k = select_sites(report, "all", k=K)
    modules = dict(model.named_modules())
    before = {n: sum(p.numel() for p in modules[n].parameters()) for n in site_k}
    channels = {s.name: s.channels for s in report.sites}
    apply_an(model, site_k, head=head)
    after = dict(model.named_modules())
    for n, k in site_k.items():
        c = channels[n]
        expected = 2 * k * c + HEAD_PARAMS[head](c, k) - before[n]
        measured = sum(p.numel() for p in after[n].parameters()) - before[n]
        assert measured == expected, (n, head)
    model.train()
    model(torch.randn(2, 3, 32, 32)).mean().backward()
