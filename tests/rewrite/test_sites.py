"""Site discovery and labelling on real timm models (pretrained=False)."""

from __future__ import annotations

import timm
import torch
from timm.layers import BatchNormAct2d, ConvNormAct, GroupNormAct, ScaledStdConv2d, StdConv2d
from torch import nn

from an_search.rewrite import find_sites, trace_model


def _sites(report):
    return {s.name: s for s in report.sites}


def test_resnet50_roles_blocks_stages() -> None:
    report = find_sites(timm.create_model("resnet50", pretrained=False))
    sites = _sites(report)
    assert report.traced and report.fallback_reason is None
    assert report.num_stages == 4 and report.stage_keys == ["layer1", "layer2", "layer3", "layer4"]
    assert len(sites) == 53  # stem + 16 blocks * 3 + 4 downsample
    bn2 = sites["layer1.0.bn2"]
    assert {"after-3x3", "after-spatial", "middle-in-block"} <= set(bn2.roles)
    assert "after-1x1" not in bn2.roles
    assert bn2.block == "layer1.0" and bn2.stage == 0 and bn2.channels == 64
    for name in ("layer1.0.bn3", "layer3.5.bn3"):
        assert {"after-1x1", "before-residual-add", "last-in-block"} <= set(sites[name].roles)
    ds = sites["layer2.0.downsample.1"]
    assert "after-1x1" in ds.roles and ds.block == "layer2.0" and ds.stage == 1
    # the shortcut norm is not on the residual branch and takes no block position
    assert not {"before-residual-add", "last-in-block"} & set(ds.roles)
    assert {"after-1x1", "before-spatial", "first-in-block"} <= set(sites["layer4.2.bn1"].roles)
    stem = sites["bn1"]
    assert stem.stage is None and stem.block is None and stem.roles == ("after-spatial",)
    assert [s.order for s in report.sites] == list(range(53))
    assert all(s.supported and s.base == "batchnorm" for s in report.sites)


def test_resnet18_basic_block_roles() -> None:
    sites = _sites(find_sites(timm.create_model("resnet18", pretrained=False)))
    assert {"after-3x3", "before-spatial", "first-in-block"} <= set(sites["layer1.0.bn1"].roles)
    assert {"after-3x3", "before-residual-add", "last-in-block"} <= set(sites["layer1.0.bn2"].roles)


def test_mobilenetv2_stages_and_depthwise() -> None:
    report = find_sites(timm.create_model("mobilenetv2_100", pretrained=False))
    sites = _sites(report)
    assert report.num_stages == 7
    assert report.stage_keys == [f"blocks.{i}" for i in range(7)]
    dw = [s.name for s in report.sites if "after-depthwise" in s.roles]
    assert len(dw) == 17 and "blocks.0.0.bn1" in dw and "blocks.6.0.bn2" in dw
    assert sites["blocks.1.0.bn2"].norm_type == "BatchNormAct2d"
    assert "before-residual-add" in sites["blocks.1.1.bn3"].roles  # has a skip
    assert "before-residual-add" not in sites["blocks.1.0.bn3"].roles  # stride 2: no skip
    assert sites["bn1"].stage is None and sites["bn2"].stage is None  # stem and head


def test_mixed_and_conditional_convolutions_are_convolutions() -> None:
    """timm's MixedConv2d (a split, one depthwise conv per kernel size, a cat) and CondConv2d
    (expert kernels mixed per sample, not a torch conv class): the norm after them is after a
    spatial, depthwise conv, and the one before feeds a spatial conv, as in their plain-conv
    models (before: neither was seen, so ``after-depthwise`` found 3 and 8 sites of 16 and
    ``paper`` took each block's first norm, after the 1x1 conv)."""
    from an_search.rewrite import select_sites

    for name, block, conv in (
        ("mixnet_s", "blocks.2.0", "MixedConv2d"),
        ("efficientnet_cc_b0_4e", "blocks.4.0", "CondConv2d"),
    ):
        model = timm.create_model(name, num_classes=10)
        assert type(model.get_submodule(f"{block}.conv_dw")).__name__ == conv
        report = find_sites(model)
        by = {s.name: s.roles for s in report.sites}
        assert {"after-spatial", "after-depthwise"} <= set(by[f"{block}.bn2"]), name
        assert "after-3x3" not in by[f"{block}.bn2"] and "after-1x1" not in by[f"{block}.bn2"]
        assert {"after-1x1", "before-spatial"} <= set(by[f"{block}.bn1"]), name
        depthwise = select_sites(report, "after-depthwise")
        blocks = {s.name.rsplit(".", 1)[0] for s in report.sites if s.name.startswith("blocks.")}
        assert len(depthwise) == len(blocks) == 16, name
        assert f"{block}.bn2" in select_sites(report, "paper"), name


def test_densenet121_stages_and_transitions() -> None:
    report = find_sites(timm.create_model("densenet121", pretrained=False))
    sites = _sites(report)
    assert report.num_stages == 4
    assert report.stage_keys == [f"features.denseblock{i}" for i in range(1, 5)]
    norm2 = sites["features.denseblock2.denselayer3.norm2"]
    assert {"after-1x1", "before-spatial"} <= set(norm2.roles) and norm2.stage == 1
    # transitions lie outside blocks; a tie on "features" goes to the next stage
    assert sites["features.transition1.norm"].block is None
    assert sites["features.transition1.norm"].stage == 1
    assert sites["features.norm5"].stage is None


def test_convnext_and_vit_stage_counts() -> None:
    convnext = find_sites(timm.create_model("convnext_atto", pretrained=False))
    sites = _sites(convnext)
    assert convnext.num_stages == 4
    assert {"after-depthwise", "after-spatial"} <= set(sites["stages.2.blocks.1.norm"].roles)
    assert sites["stages.2.downsample.0"].block is None
    assert sites["stages.2.downsample.0"].stage == 2  # longest shared prefix "stages.2"
    assert sites["stem.1"].stage is None and sites["head.norm"].stage is None
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4)
    report = find_sites(vit)
    assert report.num_stages == 1 and report.stage_keys == ["blocks"]
    assert _sites(report)["blocks.3.norm1"].roles == ("first-in-block",)
    assert _sites(report)["norm"].stage is None
    assert len(report.sites) == 4 * 2 + 1


class _WeightStdNet(nn.Module):
    """Weight-standardised convs call F.batch_norm on weights: none of that is a site."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = StdConv2d(3, 8, 3, padding=1)
        self.norm1 = GroupNormAct(8, num_groups=2)
        self.conv2 = ScaledStdConv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2(self.norm1(self.conv1(x))))


def test_weight_standardisation_makes_no_false_sites() -> None:
    net = _WeightStdNet()
    sites = _sites(find_sites(net))
    assert set(sites) == {"norm1", "bn"}
    assert {"after-3x3"} <= set(sites["norm1"].roles) and "after-1x1" in sites["bn"].roles
    bit = timm.create_model("resnetv2_50x1_bit", pretrained=False)
    names = {n for n, m in bit.named_modules() if isinstance(m, nn.GroupNorm)}
    report = find_sites(bit)
    assert report.traced and {s.name for s in report.sites} == names and len(names) == 49
    assert report.num_stages == 4


class _Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > 0:
            x = self.blocks(x)
        return x


def test_untraceable_model_falls_back_to_names() -> None:
    net = _Branchy().train()
    report = find_sites(net)
    assert not report.traced
    assert report.fallback_reason and "\n" not in report.fallback_reason
    assert [s.name for s in report.sites] == ["stem.1", "blocks.0.1", "blocks.0.2"]
    first, last = report.sites[1], report.sites[2]
    assert first.block == "blocks.0" and first.roles == ("first-in-block",)
    assert last.roles == ("last-in-block",) and report.num_stages == 1
    assert net.training and all(m.training for m in net.modules())


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = BatchNormAct2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn(self.conv(x))) + x


class _LeafBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.stem_bn = nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(_Opaque(), _Opaque())
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_bn(self.blocks(self.stem_bn(self.stem(x))))


def test_norms_inside_leaf_blocks_are_found_by_name(monkeypatch) -> None:
    import an_search.rewrite.tracer as tracer

    leaves = tracer._leaf_types
    monkeypatch.setattr(tracer, "_leaf_types", lambda: (*leaves(), _Opaque))
    report = find_sites(_LeafBlockNet())
    sites = _sites(report)
    assert report.traced
    names = ["stem_bn", "blocks.0.bn", "blocks.0.bn2", "blocks.1.bn", "blocks.1.bn2", "head_bn"]
    assert [s.name for s in report.sites] == names
    assert set(sites["stem_bn"].roles) == {"after-spatial", "after-3x3"}
    assert sites["blocks.1.bn"].roles == ("first-in-block",)  # no graph roles inside a leaf
    assert sites["blocks.1.bn2"].roles == ("last-in-block",) and sites["blocks.1.bn2"].stage == 0


_SCALE = torch.ones(3, 1, 1)  # a global tensor: fx stores it on the root while tracing


class _WithConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * _SCALE


def test_tracing_leaves_the_model_unchanged() -> None:
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.1).train()
    model.layer1.eval()
    before = {n: m.training for n, m in model.named_modules()}
    assert trace_model(model).graph is not None
    assert {n: m.training for n, m in model.named_modules()} == before
    net = _WithConstant()
    attrs, buffers = set(vars(net)), list(net.state_dict())
    graph = trace_model(net).graph
    assert any(n.op == "get_attr" and "constant" in str(n.target) for n in graph.nodes)
    assert set(vars(net)) == attrs and list(net.state_dict()) == buffers


class _TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(8, 8, 1)
        self.conv2 = ConvNormAct(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class _ConvNormActStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(3, 8, 3), ConvNormAct(8, 8, 3))
        self.blocks = nn.Sequential(_TwoConv(), _TwoConv())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def test_conv_norm_act_units_are_layers_not_blocks() -> None:
    report = find_sites(_ConvNormActStem())
    sites = _sites(report)
    assert report.stage_keys == ["blocks"]
    assert sites["stem.0.bn"].block is None and sites["stem.1.bn"].stage is None
    assert sites["blocks.1.conv2.bn"].block == "blocks.1"
    assert {"after-3x3", "before-residual-add", "last-in-block"} <= set(
        sites["blocks.1.conv2.bn"].roles
    )


def test_regnet_stage_modules_count_as_containers() -> None:
    report = find_sites(timm.create_model("regnetx_002", pretrained=False))
    assert report.stage_keys == ["s1", "s2", "s3", "s4"]
    assert _sites(report)["s3.b2.conv2.bn"].block == "s3.b2"
