"""AN on a CUDA GPU against the CPU in float64: layer, bfloat16 autocast, a converted timm
model, torch.compile and a proxy training with AMP. Skipped without CUDA (run them when a GPU
is lent: ``pytest -m gpu``).

Tolerances: float32 on the GPU against float64 on the CPU is far below 1e-4 for the layer; a
whole network's convolutions run in TF32 by default (cuDNN), about 1e-3 relative each, hence
1e-2 on the logits; bfloat16 keeps 8 bits of mantissa, hence 5e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from an_search import convert
from an_search.layers import AttentiveNorm
from an_search.layers._device_eval import DEVICE_PLAN_ATTR
from an_search.layers._triton_spec import site
from an_search.train import TrainConfig, proxy_train, resolve_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
C, K = 16, 5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("base", ["batchnorm", "groupnorm"])
@pytest.mark.parametrize("head", ["default", "bn-softmax"])
def test_layer_on_cuda_matches_cpu_float64(base: str, head: str) -> None:
    an = AttentiveNorm(C, K, base=base, head=head, num_groups=4)
    ref = copy.deepcopy(an).double()
    an = an.cuda()
    for training in (True, True, False):
        an.train(training)
        ref.train(training)
        x = torch.randn(8, C, 7, 7, dtype=torch.double) * 3 + 1
        xc = x.float().cuda().requires_grad_()
        _step_matches(an, ref, xc, x)
    _assert_grads_and_buffers(an, ref, batches=2)


def _step_matches(an: nn.Module, ref: nn.Module, xc: torch.Tensor, x: torch.Tensor) -> None:
    """One step of ``an`` on the GPU input ``xc`` against ``ref`` on the CPU float64 ``x``."""
    xr = x.clone().requires_grad_()
    y, y_ref = an(xc), ref(xr)
    assert y.is_cuda and _rel(y, y_ref) < 1e-5
    g = torch.randn_like(x)
    y.backward(g.float().cuda())
    y_ref.backward(g)
    assert _rel(xc.grad, xr.grad) < 1e-4


def _assert_grads_and_buffers(an: nn.Module, ref: nn.Module, batches: int) -> None:
    for (name, p), p_ref in zip(an.named_parameters(), ref.parameters(), strict=True):
        assert _rel(p.grad, p_ref.grad) < 1e-4, name
    for (name, b), b_ref in zip(an.named_buffers(), ref.buffers(), strict=True):
        if b.is_floating_point():
            assert _rel(b, b_ref) < 1e-5, name
        else:
            assert int(b) == int(b_ref) == batches, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bfloat16_autocast_on_cuda_follows_float32(training: bool) -> None:
    conv = nn.Conv2d(3, C, 3, padding=1).cuda()
    an = AttentiveNorm(C, K).cuda().train(training)
    ref = copy.deepcopy(an)
    x = torch.randn(8, 3, 14, 14, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = conv(x)
        y = an(h)
    assert h.dtype == y.dtype == torch.bfloat16
    y_ref = ref(h.detach().float())
    assert _rel(y, y_ref) < 5e-2
    if training:
        y.float().square().sum().backward()
        y_ref.square().sum().backward()
        assert _rel(an.weight.grad, ref.weight.grad) < 5e-2
        assert _rel(an.norm.running_var, ref.norm.running_var) < 1e-2


@pytest.mark.parametrize("head", ["default", "mlp", "bn-softmax"])
def test_folded_eval_on_cuda_matches_cpu(head: str) -> None:
    """Eval without autograd on a GPU takes the folded site (_device_eval.py): any layout,
    bfloat16 under autocast."""
    an = AttentiveNorm(C, K, head=head)
    with torch.no_grad():
        for _ in range(3):  # running statistics other than their init
            an(torch.randn(8, C, 5, 5) * 2 + 0.5)
    an.eval()
    x = torch.randn(8, C, 14, 14) * 2 + 1
    gpu = copy.deepcopy(an).cuda()
    with torch.no_grad():
        y = gpu(x.cuda())
        y_cl = gpu(x.cuda().to(memory_format=torch.channels_last))
        with torch.autocast("cuda", dtype=torch.bfloat16):  # an AMP validation pass
            y16 = gpu(x.cuda().bfloat16())
        ref = copy.deepcopy(an).double()(x.double())
    assert DEVICE_PLAN_ATTR in gpu.__dict__
    assert _rel(y, ref) < 1e-5 and _rel(y_cl, ref) < 1e-5
    assert y16.dtype == torch.bfloat16 and _rel(y16, ref) < 1e-2
    folded = gpu.fuse()  # the deployed form: the same folded ops (folded on the GPU too)
    with torch.no_grad():
        assert torch.equal(folded(x.cuda()), y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.equal(folded(x.cuda().bfloat16()), y16)
        assert _rel(folded.half()(x.cuda().half()), ref) < 1e-2  # a half model


def test_converted_resnet_on_cuda_matches_cpu() -> None:
    model = convert("resnet18", placement="paper", num_classes=10, cost=False).model
    x = torch.randn(4, 3, 64, 64)
    for training in (True, False):
        cpu = copy.deepcopy(model).double().train(training)
        gpu = copy.deepcopy(model).cuda().train(training)
        with torch.no_grad():
            out_cpu, out_gpu = cpu(x.double()), gpu(x.cuda())
        assert _rel(out_gpu, out_cpu) < 1e-2, training
        for (name, b), b_ref in zip(gpu.named_buffers(), cpu.buffers(), strict=True):
            if b.is_floating_point():
                assert _rel(b, b_ref) < 1e-2, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_layer_on_cuda_matches_eager(training: bool) -> None:
    an = AttentiveNorm(C, K).cuda().train(training)
    ref = copy.deepcopy(an)
    compiled = torch.compile(an, fullgraph=True)
    x = torch.randn(8, C, 14, 14, device="cuda") * 2 + 1
    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = compiled(xc), ref(xr)
    assert _rel(y, y_ref) < 1e-5
    if training:
        g = torch.randn_like(x)
        y.backward(g)
        y_ref.backward(g)
        assert _rel(xc.grad, xr.grad) < 1e-4
        assert _rel(an.weight.grad, ref.weight.grad) < 1e-4
        assert _rel(an.norm.running_mean, ref.norm.running_mean) < 1e-5


def test_proxy_training_with_amp_on_cuda_learns() -> None:
    torch.manual_seed(0)
    model = convert("resnet10t", placement="paper", num_classes=10, in_chans=3, cost=False).model
    before = copy.deepcopy(model)
    train = TrainConfig(
        epochs=3, batches_per_epoch=20, batch_size=32, img_size=32, val_fraction=0.1,
        device="cuda", amp=True,
    )  # fmt: skip
    result = proxy_train(model, resolve_data(None), train)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    losses = [h["train_loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert result.top1 > 100 / 10, result.history  # above chance on 10 classes
    moved = [_rel(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True)]
    assert min(moved) > 0  # every parameter trained (on the GPU: the model was moved there)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("head", ["default", "bn-softmax", "gn-hsigmoid", "mlp-bn"])
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (64, 512, 7, 7), (8, 40, 5, 5)])
def test_triton_site_on_cuda_matches_cpu_float64(
    head: str, shape: tuple[int, ...], fmt: torch.memory_format
) -> None:
    pytest.importorskip("triton")
    c = shape[1]
    an = AttentiveNorm(c, 10, head=head)
    ref = copy.deepcopy(an).double()
    an = an.cuda()
    an.triton = True
    for training in (True, True, False):
        an.train(training)
        ref.train(training)
        x = torch.randn(shape, dtype=torch.double) * 3 + 1
        xc = x.float().cuda().contiguous(memory_format=fmt).requires_grad_()
        assert site(an, xc, None) is not None  # the kernels take this input (checked only)
        _step_matches(an, ref, xc, x)
    _assert_grads_and_buffers(an, ref, batches=2)


def test_triton_site_under_bfloat16_autocast() -> None:
    pytest.importorskip("triton")
    conv = nn.Conv2d(3, C, 3, padding=1).cuda()
    an = AttentiveNorm(C, K).cuda()
    an.triton = True
    ref = copy.deepcopy(an)
    ref.triton = False
    x = torch.randn(8, 3, 14, 14, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = conv(x)
        y = an(h)
    assert y.dtype == torch.bfloat16
    y_ref = ref(h.detach().float())
    assert _rel(y, y_ref) < 5e-2
    y.float().square().sum().backward()
    y_ref.square().sum().backward()
    assert _rel(an.weight.grad, ref.weight.grad) < 5e-2


def test_triton_direct_launches_match_the_usual_path(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from an_search.layers import _triton_launch as tl  # noqa: PLC0415

    torch.manual_seed(0)
    an = AttentiveNorm(64, 10, head="mlp-bn").cuda()
    an.triton = True
    x, g = torch.randn(16, 64, 14, 14, device="cuda"), torch.randn(16, 64, 14, 14, device="cuda")

    def step(direct: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(tl, "_DIRECT", direct)
        m = copy.deepcopy(an)
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        grads = [p.grad for p in m.parameters()]
        return [y, xi.grad, *grads, *m.buffers()]

    usual = step(False)
    tl._cache.clear()
    step(True)  # the first launch of each specialisation: the usual path, then kept
    kept = len(tl._cache)
    direct = step(True)
    assert kept == 10 and not tl._refused  # all ten kernels of the site, each called directly
    assert len(direct) == len(usual)
    for a, b in zip(direct, usual, strict=True):
        assert torch.equal(a, b)  # the same kernels on the same arguments (no atomics)


def test_triton_and_folded_sites_replay_as_cuda_graphs() -> None:
    """A converted model's training step (the Triton sites, forward and backward) and its
    inference (the folded eval sites), each captured once as a CUDA graph after warm-up calls
    on a side stream (bench/models.py --cuda-graphs), replay on new data to what eager steps
    give: loss, gradients, running statistics and logits."""
    torch.manual_seed(0)
    model = convert("resnet10t", placement="all", num_classes=10, cost=False).model.cuda()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    fresh = torch.randn_like(x)

    def train_step(m: nn.Module) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    def infer(m: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return m(x)

    for mode, fn in (("train", train_step), ("eval", infer)):
        model.train(mode == "train")
        twin.train(mode == "train")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(model)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(model)
        saved = x.clone()
        for _ in range(3):  # the twin takes the warm-up steps' updates of the statistics
            fn(twin)
        x.copy_(fresh)
        graph.replay()
        ref = fn(twin)
        x.copy_(saved)
        torch.cuda.synchronize()
        assert _rel(out, ref) < 1e-3, mode
        for (name, p), p_ref in zip(model.named_parameters(), twin.parameters(), strict=True):
            if mode == "train":
                assert _rel(p.grad, p_ref.grad) < 1e-3, name
        for (name, b), b_ref in zip(model.named_buffers(), twin.buffers(), strict=True):
            if b.is_floating_point():
                assert _rel(b, b_ref) < 1e-4, name
            else:
                assert torch.equal(b, b_ref), name
