"""count_cost on models without AN: the stock fvcore figures, unchanged."""

from __future__ import annotations

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis

from an_search.cost import UNIT, count_cost
from an_search.errors import ModelConfigError

INPUT = (3, 32, 32)
BATCH = 2


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


@pytest.fixture(scope="module")
def report(resnet18: torch.nn.Module):
    return count_cost(resnet18, INPUT, batch_size=BATCH)


def test_macs_equal_stock_fvcore(resnet18: torch.nn.Module, report) -> None:
    stock = FlopCountAnalysis(resnet18.eval(), torch.randn(BATCH, *INPUT))
    stock.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert report.macs == stock.total()
    assert report.by_operator == dict(stock.by_operator())
    assert report.unsupported_ops == dict(stock.unsupported_ops())
    assert report.by_module == {}
    assert report.an_macs == 0


def test_params_are_all_parameters(resnet18: torch.nn.Module, report) -> None:
    assert report.params == sum(p.numel() for p in resnet18.parameters())


def test_report_records_input_and_unit(report) -> None:
    assert report.input_shape == (BATCH, *INPUT)
    assert report.unit == UNIT
    assert "MAC" in report.unit


def test_conv_macs_follow_formula(resnet18: torch.nn.Module, report) -> None:
    # Each conv: batch * out_h * out_w * out_channels * in_channels/groups * kh * kw.
    expected = 0
    sizes: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        def _record(module, inputs, output) -> None:
            sizes[name] = tuple(output.shape[-2:])

        return _record

    convs = {n: m for n, m in resnet18.named_modules() if isinstance(m, torch.nn.Conv2d)}
    handles = [m.register_forward_hook(hook(n)) for n, m in convs.items()]
    with torch.no_grad():
        resnet18.eval()(torch.randn(1, *INPUT))
    for h in handles:
        h.remove()
    for name, conv in convs.items():
        h, w = sizes[name]
        expected += BATCH * h * w * conv.weight.numel()
    assert report.by_operator["conv"] == expected


def test_flop_counter_agrees_on_matmul_like_ops(report) -> None:
    fvcore_matmul = sum(
        n for op, n in report.by_operator.items() if op in {"conv", "linear", "addmm", "matmul"}
    )
    assert report.flop_counter_macs == pytest.approx(fvcore_matmul, rel=0.01)
    assert report.flop_counter_macs < report.macs  # no norms, pooling or elementwise ops


def test_batch_scales_linearly(resnet18: torch.nn.Module, report) -> None:
    single = count_cost(resnet18, INPUT, batch_size=1)
    assert single.macs * BATCH == report.macs
    assert single.params == report.params


def test_modes_restored() -> None:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    model.train()
    model.layer1.eval()  # a mixed-mode model must come back mixed
    count_cost(model, (3, 32, 32))
    assert model.training
    assert not model.layer1.training
    assert all(not m.training for m in model.layer1.modules())
    assert model.layer2.training


def test_running_stats_untouched() -> None:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_cost(model, (3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # one resnet50 trace at 224x224: 2 s idle, over 10 s on a busy machine
def test_resnet50_reference_figures() -> None:
    model = timm.create_model("resnet50", pretrained=False)
    report = count_cost(model)
    assert report.params == 25_557_032
    assert report.macs == pytest.approx(4.1e9, rel=0.01)
    assert report.macs == 4_111_512_576  # stock fvcore at 224x224


def test_global_rng_untouched(resnet18: torch.nn.Module) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    count_cost(resnet18, INPUT)
    assert torch.equal(torch.rand(3), expected)


def test_a_model_flop_counter_cannot_run_is_still_counted() -> None:
    """torch's FlopCounterMode fails on PiT (its module tracker asserts on the tuple its
    blocks pass on): the cross-check is left out, fvcore's count stands."""
    torch.manual_seed(0)
    pit = timm.create_model("pit_ti_224", pretrained=False, img_size=64, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    from torch.utils.flop_counter import FlopCounterMode

    with pytest.raises(AssertionError), FlopCounterMode(display=False), torch.no_grad():
        pit.eval()(x)  # what the cross-check meets (if torch fixes it, this test says so)
    report = count_cost(pit, (3, 64, 64))
    for m in pit.modules():  # (fused attention: stock fvcore counts the unfused form alone)
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    stock = FlopCountAnalysis(pit.eval(), x)
    stock.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert report.macs == stock.total() > 0 and report.flop_counter_macs is None


def test_an_input_smaller_than_the_models_downsampling_is_named() -> None:
    """ConvNeXt's last downsampling conv (2x2) cannot run on the 1x1 map of a 16 px input: a
    one-line error naming the size to give, not torch's RuntimeError."""
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    need = max(f["reduction"] for f in model.feature_info)
    with pytest.raises(ModelConfigError) as info:
        count_cost(model, (3, 16, 16))
    text = str(info.value)
    assert text.startswith(f"a 16x16 input is too small for this model, which downsamples {need}x")
    assert "Kernel size can't be greater than actual input size" in text
    assert text.endswith(f"give a larger --img-size, {need} or more") and "\n" not in text
    assert count_cost(model, (3, need, need)).macs > 0


def test_a_failing_forward_on_a_large_enough_input_is_raised_as_it_is() -> None:
    class Broken(torch.nn.Module):
        feature_info = [{"reduction": 4}]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("a bug of the model's own")

    with pytest.raises(RuntimeError, match="a bug of the model's own"):
        count_cost(Broken(), (3, 8, 8))


class _OnlyAt224(torch.nn.Module):
    """A timm-like model (its pretrained_cfg names its size) that takes only its size."""

    pretrained_cfg = {"input_size": (3, 224, 224)}

    def __init__(self, an: bool = False) -> None:
        super().__init__()
        from an_search.layers import AttentiveNorm

        self.norm = AttentiveNorm(3, 2) if an else torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 224:
            raise RuntimeError("a fixed grid")
        return self.norm(x).mean()


def test_a_size_a_timm_model_without_an_fails_on_is_the_inputs_fault() -> None:
    """A timm model without AN (counted before any conversion) failing at a size other than its
    default: a ModelConfigError naming the default (CrossViT at 32 px was an internal error);
    the same failure in a model with AN is a conversion's bug, shown as it is, as is a failure
    at the model's own default size (the test above: a model with no default)."""
    with pytest.raises(
        ModelConfigError,
        match=r"^this model fails on a 32x32 input \(Runtime"
        r"Error: a fixed grid\): it may not take that size; give its default, "
        r"--img-size 224, or another size it takes$",
    ):
        count_cost(_OnlyAt224(), INPUT)
    assert count_cost(_OnlyAt224(), (3, 224, 224)).params == 6
    with pytest.raises(RuntimeError, match="^a fixed grid$"):
        count_cost(_OnlyAt224(an=True), INPUT)
    at_default = _OnlyAt224()
    at_default.pretrained_cfg = {"input_size": (3, 32, 32)}
    with pytest.raises(RuntimeError, match="^a fixed grid$"):
        count_cost(at_default, INPUT)


def test_timms_asserts_on_a_size_its_grids_cannot_have_are_the_inputs_fault() -> None:
    """timm's models refuse a size by assert (ViT built for 224, Twins' patch grid) or fail
    indexing (MViTv2): the one-line error naming the size (before: internal errors)."""
    import timm

    from an_search.models import create_model

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(ModelConfigError, match=r"^this model fails on a 112x112 input \(Assert"
                       r"ionError: Input height \(112\) .*--img-size 224, "):  # fmt: skip
        count_cost(vit, (3, 112, 112))
    with pytest.raises(ModelConfigError, match=r"^timm cannot build 'twins_svt_small' with "
                       r"\{'img_size': 100\} \(.*: drop or fix these options$"):  # fmt: skip
        create_model("twins_svt_small", img_size=100)


def test_a_failure_without_a_message_on_a_too_small_input_is_still_named() -> None:
    """A model raising a bare RuntimeError() on a too-small input: the one-line error, not an
    IndexError from reading the message's first line."""

    class Bare(torch.nn.Module):
        feature_info = [{"reduction": 32}]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError()

    with pytest.raises(ModelConfigError) as info:
        count_cost(Bare(), (3, 8, 8))
    assert str(info.value) == (
        "a 8x8 input is too small for this model, which downsamples 32x (RuntimeError: ): "
        "give a larger --img-size, 32 or more"
    )


def test_fused_attention_counts_as_its_unfused_matmuls() -> None:
    """timm's attention as ``scaled_dot_product_attention`` (stock fvcore: zero) counts what
    fvcore counts for the same attention unfused (``q @ k^T``, ``attn @ v``): by hand, per
    block L x L x (E + E) a head and sample."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False)
    size = vit.pretrained_cfg["input_size"]
    fused = count_cost(vit, size)
    blocks = [m for m in vit.modules() if hasattr(m, "fused_attn")]
    assert blocks and all(m.fused_attn for m in blocks)
    for m in blocks:
        m.fused_attn = False
    unfused = count_cost(vit, size)
    assert fused.macs == unfused.macs
    assert "aten::scaled_dot_product_attention" not in fused.unsupported_ops
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    per_block = blocks[0].num_heads * tokens * tokens * 2 * blocks[0].head_dim
    assert fused.by_operator["scaled_dot_product_attention"] == len(blocks) * per_block
