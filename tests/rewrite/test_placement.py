"""Placement presets, selection precedence, patterns and K validation."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from torch import nn

from an_search.errors import InvalidKError, NoSitesSelectedError, UnknownNameError
from an_search.rewrite import find_sites, select_sites


@pytest.fixture(scope="module")
def r50():
    return find_sites(timm.create_model("resnet50", pretrained=False))


@pytest.fixture(scope="module")
def r18():
    return find_sites(timm.create_model("resnet18", pretrained=False))


def test_paper_resnet50(r50) -> None:
    chosen = select_sites(r50, "paper")
    blocks = [(1, 3), (2, 4), (3, 6), (4, 3)]
    expected = {f"layer{i}.{j}.bn2": (10 if i <= 2 else 20) for i, n in blocks for j in range(n)}
    assert chosen == expected and len(chosen) == 16
    assert list(chosen) == list(expected)  # execution order


def test_paper_resnet18_basic_blocks(r18) -> None:
    chosen = select_sites(r18, "paper")
    assert chosen == {
        f"layer{i}.{j}.bn1": (10 if i <= 2 else 20) for i in (1, 2, 3, 4) for j in (0, 1)
    }


def test_paper_mobilenetv2() -> None:
    report = find_sites(timm.create_model("mobilenetv2_100", pretrained=False))
    chosen = select_sites(report, "paper")
    dw = [s.name for s in report.sites if "after-depthwise" in s.roles]
    assert list(chosen) == dw and len(chosen) == 17
    stage_k = {s.stage: chosen[s.name] for s in report.sites if s.name in chosen}
    assert [stage_k[i] for i in range(7)] == [5, 5, 5, 5, 10, 10, 10]
    assert select_sites(report, "after-depthwise") == chosen


def test_paper_densenet121_norm2() -> None:
    report = find_sites(timm.create_model("densenet121", pretrained=False))
    chosen = select_sites(report, "paper")
    layers = [6, 12, 24, 16]
    assert len(chosen) == sum(layers)
    assert all(name.endswith(".norm2") for name in chosen)
    assert chosen["features.denseblock2.denselayer12.norm2"] == 10
    assert chosen["features.denseblock3.denselayer1.norm2"] == 20


def test_paper_vit_first_norm_per_block() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3)
    assert select_sites(find_sites(vit), "paper") == {f"blocks.{i}.norm1": 10 for i in range(3)}


def test_other_presets(r50) -> None:
    last = select_sites(r50, "last-in-block", k=4)
    assert len(last) == 16 and all(n.endswith(".bn3") for n in last)
    assert set(last.values()) == {4}
    assert len(select_sites(r50, "all")) == 53
    assert set(select_sites(r50, "after-3x3")) == set(select_sites(r50, "paper"))
    with pytest.raises(NoSitesSelectedError, match="--list-sites"):
        select_sites(r50, "none")
    assert select_sites(r50, "none", include=["bn1"]) == {"bn1": 10}  # stem: stage 0's K


def test_precedence_filters_then_include_then_exclude(r50) -> None:
    chosen = select_sites(r50, "all", roles=["after-1x1"], stages=[3], norm_types=["BatchNorm2d"])
    assert set(chosen) == {f"layer4.{j}.bn{b}" for j in range(3) for b in (1, 3)} | {
        "layer4.0.downsample.1"
    }
    chosen = select_sites(
        r50, "paper", stages=[0], include=["layer4.*.bn3"], exclude=["layer1.1.*", "layer4.2.*"]
    )
    assert set(chosen) == {"layer1.0.bn2", "layer1.2.bn2", "layer4.0.bn3", "layer4.1.bn3"}
    # exclude has the last word even over include
    assert "bn1" not in select_sites(r50, "paper", include=["bn1"], exclude=["bn1"])
    # a base kind works as a norm type
    assert len(select_sites(r50, "all", norm_types=["batchnorm"])) == 53


def test_one_name_is_one_filter_not_its_letters(r50) -> None:
    """A lone string (or int) means a one-item list: a string is a Sequence[str] of letters,
    and "layer4.*" as letters held the pattern "*", which excluded every site."""
    one = select_sites(r50, "all", exclude="layer4.0.bn1")
    assert set(one) == set(select_sites(r50, "all")) - {"layer4.0.bn1"}
    assert set(select_sites(r50, "all", exclude="layer4.*")) == {
        n for n in select_sites(r50, "all") if not n.startswith("layer4.")
    }
    assert select_sites(r50, "none", include="bn1") == {"bn1": 10}
    assert select_sites(r50, "all", roles="after-1x1", stages=3, norm_types="BatchNorm2d") == (
        select_sites(r50, "all", roles=["after-1x1"], stages=[3], norm_types=["BatchNorm2d"])
    )
    for kwargs, text in [
        ({"stages": "3"}, "stages takes int items (one, or a list of them), not str: '3'"),
        ({"stages": [1.0]}, "stages takes int items (one, or a list of them), not float: 1.0"),
        ({"exclude": [3]}, "exclude takes str items (one, or a list of them), not int: 3"),
    ]:
        with pytest.raises(TypeError, match=re.escape(text)):
            select_sites(r50, "all", **kwargs)


def test_glob_vs_regex(r50) -> None:
    glob = select_sites(r50, "none", include=["layer[12].0.bn?"])
    assert set(glob) == {f"layer{i}.0.bn{b}" for i in (1, 2) for b in (1, 2, 3)}
    regex = select_sites(r50, "none", include=[r"re:layer[12]\.0\.bn[13]"])
    assert set(regex) == {f"layer{i}.0.bn{b}" for i in (1, 2) for b in (1, 3)}
    # "." is literal in globs and a wildcard in regexes; both match whole names
    assert select_sites(r50, "none", include=["re:layer1.0.bn2"]) == {"layer1.0.bn2": 10}
    with pytest.raises(NoSitesSelectedError):
        select_sites(r50, "none", include=["layer1.0.bn"])  # glob: no partial match
    with pytest.raises(NoSitesSelectedError, match="not a valid regex"):
        select_sites(r50, "paper", exclude=["re:layer(1"])


def test_k_forms_and_errors(r50) -> None:
    assert set(select_sites(r50, "paper", k=3).values()) == {3}
    per_stage = select_sites(r50, "paper", k=[1, 2, 3, 4])
    assert per_stage["layer1.0.bn2"] == 1 and per_stage["layer4.2.bn2"] == 4
    with pytest.raises(InvalidKError, match=r"3 values .* 4 stages .*layer1"):
        select_sites(r50, "paper", k=[10, 10, 20])
    for bad in (0, -1, [10, 0, 20, 20], 2.5, True):
        with pytest.raises(InvalidKError):
            select_sites(r50, "paper", k=bad)


def test_unknown_names(r50) -> None:
    with pytest.raises(UnknownNameError, match="paper"):
        select_sites(r50, "everywhere")
    with pytest.raises(UnknownNameError, match="after-3x3"):
        select_sites(r50, "all", roles=["after-5x5"])
    with pytest.raises(UnknownNameError, match="4 stages"):
        select_sites(r50, "all", stages=[4])
    with pytest.raises(UnknownNameError, match="BatchNorm2d"):
        select_sites(r50, "all", norm_types=["LayerNorm"])
    with pytest.raises(NoSitesSelectedError, match="'paper'.*--list-sites"):
        select_sites(r50, "paper", exclude=["*"])


def test_stages_of_a_model_without_stages_say_so() -> None:
    """VGG has no blocks, so no stages (before: "the model has 0 stages (0--1)")."""
    vgg = find_sites(timm.create_model("vgg11_bn", num_classes=10))
    assert vgg.num_stages == 0
    with pytest.raises(UnknownNameError, match=r"^stage 0 does not exist: the model has no stag"):
        select_sites(vgg, "all", stages=[0])


class _WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.BatchNorm2d(4))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_unsupported_norms_are_listed_never_selected() -> None:
    report = find_sites(_WithUnsupported())
    assert [s.name for s in report.unsupported] == ["blocks.0.1"]
    assert report.by_name()["blocks.0.1"].base == "unsupported"
    # paper would pick the InstanceNorm (after a 3x3 conv) if it were supported
    assert select_sites(report, "paper") == {"blocks.0.2": 10}
    assert select_sites(report, "all", include=["*"]) == {"blocks.0.2": 10}
    with pytest.raises(NoSitesSelectedError, match="unsupported"):
        select_sites(report, "none", include=["blocks.0.1"])


def test_default_k_rule_formula(r50) -> None:
    for n in range(1, 8):
        small = math.ceil(n / 2)
        assert [10] * small + [20] * (n - small) == _default_for(n)


def _default_for(n: int) -> list[int]:
    from an_search.rewrite import SiteReport, default_k

    return default_k(SiteReport(sites=[], traced=True, num_stages=n, model_class="ResNet"))


def test_paper_regnet_after_grouped_3x3() -> None:
    report = find_sites(timm.create_model("regnetx_002", pretrained=False))
    chosen = select_sites(report, "paper")
    assert len(chosen) == 13 and all(n.endswith(".conv2.bn") for n in chosen)
    assert chosen["s2.b1.conv2.bn"] == 10 and chosen["s3.b1.conv2.bn"] == 20


def test_paper_without_blocks_takes_every_norm_after_a_spatial_conv() -> None:
    """VGG-like: conv-norm units one after another, no block: the norms after a k>1 conv."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, (1, 3), padding=(0, 1)), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
    )  # fmt: skip
    report = find_sites(model)
    assert all(s.block is None for s in report.sites)
    children = list(model)
    expected = {
        str(i)
        for i, m in enumerate(children)
        if isinstance(m, nn.BatchNorm2d) and max(children[i - 1].kernel_size) > 1
    }
    assert set(select_sites(report, "paper")) == expected == {"1", "7", "10"}


def test_k_above_the_ceiling_is_refused(r50) -> None:
    from an_search.errors import MAX_K

    assert select_sites(r50, "paper", k=MAX_K)
    for k in (MAX_K + 1, 10**20, [10, 10, 10, MAX_K + 1]):
        with pytest.raises(InvalidKError, match=f"from 1 to {MAX_K}"):
            select_sites(r50, "paper", k=k)


class _OnlyInstanceNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.InstanceNorm2d(8, affine=True)  # a norm AN does not take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (lambda: timm.create_model("nf_resnet26", pretrained=False), "has no normalization layer"),
        (_OnlyInstanceNorm, "none of the model's 1 norms is of a type AN supports"),
    ],
)
def test_a_model_without_norms_to_convert_says_so(model, needle: str) -> None:
    """Not "placement 'paper' selects no site ... adjust": no placement could select one."""
    report = find_sites(model())
    for placement in ("paper", "all", "none"):
        with pytest.raises(NoSitesSelectedError, match=needle):
            select_sites(report, placement=placement, include=["*"])
