"""Contract test of AttentiveNorm, parametrized over every attention head x base norm.

References are written here from AN_PAPER.md, independently of the library: the pooled
statistic uses ``torch.var`` (unbiased), the base norms are written out with mean/var, and the
mixture is an einsum over K.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from an_search.errors import InvalidKError, UnknownNameError
from an_search.layers import BASES, HEADS, AttentiveNorm, an_param_delta

C, K, G = 8, 4, 4
EPS = 1e-5
SHAPES = {  # input shape per base: channels_first (B, C, *) or channels_last (B, *, C)
    "batchnorm": (4, C, 5, 5),
    "batchnorm1d": (4, C, 7),
    "batchnorm3d": (4, C, 3, 3, 2),
    "groupnorm": (4, C, 5, 5),
    "layernorm": (4, 3, 5, C),
    "layernorm2d": (4, C, 5, 5),
    "rmsnorm": (4, 6, C),
    "rmsnorm2d": (4, C, 5, 5),
}
CHANNELS_LAST = {"layernorm", "rmsnorm"}
# The norm each base replaces, with its own affine (for the parameter delta).
ORIGINAL = {
    "batchnorm": lambda: nn.BatchNorm2d(C),
    "batchnorm1d": lambda: nn.BatchNorm1d(C),
    "batchnorm3d": lambda: nn.BatchNorm3d(C),
    "groupnorm": lambda: nn.GroupNorm(G, C),
    "layernorm": lambda: nn.LayerNorm(C),
    "layernorm2d": lambda: __import__("timm").layers.LayerNorm2d(C),
    "rmsnorm": lambda: nn.RMSNorm(C, eps=EPS),
    "rmsnorm2d": lambda: __import__("timm").layers.RmsNorm2d(C, eps=EPS),
}
# Learnable parameters added per head (AN_PAPER.md table), and by the mixture: 2KC.
HEAD_PARAMS = {
    "default": lambda c, k: k * c + 2 * k,
    "linear-sigmoid": lambda c, k: k * c + k,
    "linear-hsigmoid": lambda c, k: k * c + k,
    "bn-sigmoid": lambda c, k: k * c + 2 * k,
    "bn-softmax": lambda c, k: k * c + 2 * k,
    "gn-hsigmoid": lambda c, k: k * c + 2 * k,
    "mlp": lambda c, k: 2 * k * c + 2 * k + 2 * k * k + k,
    "mlp-bn": lambda c, k: 2 * k * c + 4 * k + 2 * k * k + 2 * k,
}


def _make(base: str, head: str, **kw) -> AttentiveNorm:
    eps = 1e-6 if base.startswith("layernorm") else EPS
    return AttentiveNorm(C, K, base=base, head=head, num_groups=G, eps=eps, **kw)


def _input(base: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(SHAPES[base], dtype=dtype) * 1.5 + 0.3).requires_grad_()


def _x_hat(base: str, x: torch.Tensor, an: AttentiveNorm, training: bool) -> torch.Tensor:
    """Affine-free base norm, written out."""
    if base.startswith("batchnorm"):
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if training:
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
        else:
            mean, var = an.norm.running_mean, an.norm.running_var
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
    if base == "groupnorm":
        xg = x.reshape(x.shape[0], G, -1)
        xg = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, False, keepdim=True) + EPS)
        return xg.view_as(x)
    dim = -1 if base in CHANNELS_LAST else 1
    if base.startswith("rmsnorm"):
        return x / torch.sqrt((x * x).mean(dim, keepdim=True) + EPS)
    mean, var = x.mean(dim, keepdim=True), x.var(dim, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def _statistic(base: str, x: torch.Tensor) -> torch.Tensor:
    """Paper statistic mean / sqrt(var_unbiased + 1e-3) over all axes but batch and channel."""
    dims = tuple(range(1, x.dim() - 1)) if base in CHANNELS_LAST else tuple(range(2, x.dim()))
    return x.mean(dims) / torch.sqrt(x.var(dims, unbiased=True) + 1e-3)


def _paper_default_head(an: AttentiveNorm, s: torch.Tensor, training: bool) -> torch.Tensor:
    """logits = W s; BN over the K logits (affine, running stats); hsigmoid = relu6(z+3)/6."""
    head = an.attn.head
    logits = s @ head.fc.weight.T  # (B, K)
    if training:
        mean, var = logits.mean(0), logits.var(0, unbiased=False)
    else:
        mean, var = head.norm.running_mean, head.norm.running_var
    z = (logits - mean) / torch.sqrt(var + 1e-5) * head.norm.weight + head.norm.bias
    return F.relu6(z + 3.0) / 6.0


def _reference(base: str, head: str, an: AttentiveNorm, x: torch.Tensor, training: bool):
    s = _statistic(base, x)
    if head == "default":
        lam = _paper_default_head(an, s, training)
    else:  # the head's own formula is tested in test_heads.py; here the wiring around it
        lam = copy.deepcopy(an.attn.head).train(training)(s)
    gamma = torch.einsum("bk,kc->bc", lam, an.weight)
    beta = torch.einsum("bk,kc->bc", lam, an.bias)
    if base in CHANNELS_LAST:
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (C,)
    else:
        shape = (x.shape[0], C) + (1,) * (x.dim() - 2)
    return gamma.view(shape) * _x_hat(base, x, an, training) + beta.view(shape)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("head", sorted(HEADS))
class TestAttentiveNormContract:
    def test_output_shape(self, base: str, head: str) -> None:
        an = _make(base, head)
        x = _input(base)
        for training in (True, False):
            y = an.train(training)(x)
            assert y.shape == x.shape and bool(torch.isfinite(y).all())
        assert an.weight.shape == an.bias.shape == (K, C)
        assert an.attn(x).shape == (x.shape[0], K)

    def test_matches_paper_formula(self, base: str, head: str) -> None:
        an = _make(base, head).double()
        with torch.no_grad():  # non-trivial running statistics for eval mode
            for m in an.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        x = _input(base, torch.double)
        for training in (False, True):  # eval first: the train step moves running stats
            expected = _reference(base, head, an, x, training)
            torch.testing.assert_close(an.train(training)(x), expected, msg=f"{training=}")

    def test_param_delta(self, base: str, head: str) -> None:
        norm = ORIGINAL[base]()
        an = AttentiveNorm.from_norm(norm, K, head=head)
        measured = sum(p.numel() for p in an.parameters()) - sum(
            p.numel() for p in norm.parameters()
        )
        norm_affine = C if base.startswith("rmsnorm") else 2 * C
        expected = 2 * K * C + HEAD_PARAMS[head](C, K) - norm_affine
        if head == "default" and base.startswith("batchnorm"):
            assert expected == 3 * K * C + 2 * K - 2 * C  # AN_PAPER.md
        assert measured == expected == an_param_delta(norm, K, head)

    def test_preserve_init_matches_original_norm(self, base: str, head: str) -> None:
        norm = ORIGINAL[base]()
        with torch.no_grad():
            for p in norm.parameters():
                p.normal_(0.5, 0.3)
            if hasattr(norm, "running_var"):
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
        x = _input(base)
        for training in (False, True):
            ref = copy.deepcopy(norm).train(training)
            an = AttentiveNorm.from_norm(ref, K, head=head, init="preserve")
            expected = copy.deepcopy(ref)(x)
            torch.testing.assert_close(an(x), expected, atol=2e-5, rtol=1e-4)
            for name in ("running_mean", "running_var"):
                if hasattr(norm, name):  # one train step moved both the same way
                    ref(x)
                    torch.testing.assert_close(getattr(an.norm, name), getattr(ref, name))
                    break

    def test_training_step_learns(self, base: str, head: str) -> None:
        an = _make(base, head, init="preserve").train()
        x, target = _input(base).detach(), torch.randn(SHAPES[base])
        before = {n: p.detach().clone() for n, p in an.named_parameters()}
        opt = torch.optim.SGD(an.parameters(), lr=0.05)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss = F.mse_loss(an(x), target)
            loss.backward()
            if not losses:  # preserve init: the zeroed last head layer still gets a gradient
                assert an.attn.head.last_linear().weight.grad.abs().sum() > 0
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        for name in ("weight", "bias", "attn.head." + _last_linear_name(an)):
            assert not torch.equal(before[name], dict(an.named_parameters())[name]), name

    def test_fused_equals_reference_path(self, base: str, head: str) -> None:
        an_fused = _make(base, head).double()
        an_ref = copy.deepcopy(an_fused)
        an_ref.fused = False
        x1, x2 = _input(base, torch.double), None
        x2 = x1.detach().clone().requires_grad_()
        for step in range(3):
            training = step < 2
            y1, y2 = an_fused.train(training)(x1), an_ref.train(training)(x2)
            torch.testing.assert_close(y1, y2)
            g = torch.randn_like(y1)
            y1.backward(g)
            y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad)
        for (name, p1), p2 in zip(an_fused.named_parameters(), an_ref.parameters(), strict=True):
            torch.testing.assert_close(p1.grad, p2.grad, msg=name)
        for b1, b2 in zip(an_fused.buffers(), an_ref.buffers(), strict=True):
            torch.testing.assert_close(b1, b2)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_low_precision_module(self, base: str, head: str, dtype: torch.dtype) -> None:
        """A module converted whole to float16/bfloat16 (``.to(dtype)``, as ``model.half()``
        does; no autocast) trains and evaluates on both paths, its output and gradients in
        its dtype and close to the float32 module's on the same input."""
        an32 = _make(base, head)
        x = _input(base).detach().to(dtype)
        tol = (
            {"atol": 0.02, "rtol": 0.01} if dtype == torch.float16 else {"atol": 0.1, "rtol": 0.05}
        )
        for training in (True, False):  # a training step first: running statistics move
            for fused in (True, False):
                low = copy.deepcopy(an32).to(dtype).train(training)
                low.fused = fused
                xl = x.clone().requires_grad_()
                y = low(xl)
                expected = copy.deepcopy(an32).train(training)(x.float())
                assert y.dtype == dtype
                torch.testing.assert_close(y.float(), expected, **tol)
                y.float().square().sum().backward()
                assert xl.grad.dtype == dtype and bool(torch.isfinite(xl.grad).all())
                assert all(p.grad is not None and p.grad.dtype == dtype for p in low.parameters()
                           if p.requires_grad)  # fmt: skip
            an32.train(training)(x.float())  # the float32 module's statistics move alike

    def test_empty_batch(self, base: str, head: str) -> None:
        """A batch of no samples gives an empty output of the input's shape, as the norms it
        replaces do (a detector's head with no proposals), on both paths and in both modes,
        with a backward pass and the running statistics left finite."""
        shape = (0, *SHAPES[base][1:])
        for training in (True, False):
            for fused in (True, False):
                an = _make(base, head).train(training)
                an.fused = fused
                x = torch.randn(shape, requires_grad=True)
                y = an(x)
                assert y.shape == x.shape and y.dtype == x.dtype
                y.sum().backward()
                assert x.grad is not None and x.grad.shape == x.shape
                with torch.no_grad():
                    assert an(x).shape == x.shape
                assert all(bool(torch.isfinite(b).all()) for b in an.buffers()
                           if b.is_floating_point())  # fmt: skip


def _last_linear_name(an: AttentiveNorm) -> str:
    last = an.attn.head.last_linear()
    name = next(n for n, m in an.attn.head.named_modules() if m is last)
    return f"{name}.weight"


def test_invalid_arguments_raise() -> None:
    with pytest.raises(InvalidKError):
        AttentiveNorm(C, 0)
    for kwargs, match in [
        ({"base": "instancenorm"}, "batchnorm"),
        ({"head": "attention"}, "default"),
        ({"pool": "median"}, "meanstd"),
        ({"init": "zeros"}, "preserve"),
        ({"layout": "nhwc"}, "channels_last"),
        ({"base": "batchnorm", "layout": "channels_last"}, "channels_first"),
    ]:
        with pytest.raises(UnknownNameError, match=match):
            AttentiveNorm(C, K, **kwargs)


@pytest.mark.parametrize("channels", [C - 2, C + 8])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-channels-last", "folded"])
def test_another_channel_count_is_refused_as_torchs_norms_do(channels: int, mode: str) -> None:
    """Every path checks the channels before a kernel runs (before: the CPU kernels took the
    buffers' sizes on trust: garbage out, or a heap corrupted and the process aborted)."""
    an = AttentiveNorm(C, K)
    x = torch.randn(3, channels, 5, 5, requires_grad=mode == "train")
    if mode != "train":
        an = an.eval()
        x = x.contiguous(memory_format=torch.channels_last) if mode != "eval" else x
    site = an.fuse() if mode == "folded" else an
    name = "FoldedAttentiveNorm" if mode == "folded" else "AttentiveNorm"
    with torch.no_grad() if mode != "train" else contextlib.nullcontext():
        with pytest.raises(RuntimeError, match=rf"^{name} expected input with {C} channels, but "
                           rf"got {channels} channels instead \(an input of shape "):  # fmt: skip
            site(x)
    ln = AttentiveNorm(C, K, base="layernorm")  # (B, *, C): the last dimension
    with pytest.raises(RuntimeError, match=f"got {channels} channels instead"):
        ln(torch.randn(2, 3, channels))
    assert ln(torch.randn(2, 3, C)).shape == (2, 3, C)


def test_a_gn_hsigmoid_head_needs_two_components() -> None:
    """GroupNorm(1, K) over one logit is 0 whatever the input (and torch refuses it on a batch
    of one): refused at K=1, with the way out; K=2 works."""
    with pytest.raises(InvalidKError, match="gn-hsigmoid head .* K=1 .*K of 2 or more"):
        AttentiveNorm(C, 1, head="gn-hsigmoid")
    an = AttentiveNorm(C, 2, head="gn-hsigmoid").eval()
    x = torch.randn(1, C, 5, 5, requires_grad=True)
    an(x).sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()


@pytest.mark.parametrize("head", sorted(HEADS))
def test_one_sample_training_batch_names_the_head(head: str) -> None:
    """A head with a BatchNorm1d over the batch cannot train on one sample: a ValueError that
    names the head and the way out (BatchNorm1d's own would speak of a (1, K) input); heads
    without one, and a head whose BatchNorm1d is frozen, run."""
    x = torch.randn(1, C, 5, 5)
    an = _make("batchnorm", head).train()
    has_bn = any(isinstance(m, nn.BatchNorm1d) for m in an.attn.head.modules())
    if not has_bn:
        assert an(x).shape == x.shape
        return
    with pytest.raises(ValueError, match=f"'{head}' head .* at least 2 samples, got 1") as err:
        an(x)
    assert "linear-sigmoid" in str(err.value) and "mlp," in str(err.value)
    for m in an.attn.head.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    assert an(x).shape == x.shape


def test_layout_selects_layernorm_variant() -> None:
    assert AttentiveNorm(C, K, base="layernorm", layout="channels_first").base == "layernorm2d"
    assert AttentiveNorm(C, K, base="rmsnorm2d", layout="channels_last").base == "rmsnorm"
    assert AttentiveNorm(C, K, base="layernorm").layout == "channels_last"


def test_a_map_with_no_positions_is_the_inner_norms_answer() -> None:
    """(B, C, 0, W): BatchNorm2d returns it empty (and counts the batch), GroupNorm refuses it;
    AN, its folded form and the fused path do the same."""
    x = torch.randn(2, 8, 0, 4)
    for training in (True, False):
        bn = nn.BatchNorm2d(8).train(training)
        an = AttentiveNorm(8, 3).train(training)
        y = an(x)
        assert y.shape == bn(x).shape == x.shape
        assert an.norm.num_batches_tracked == bn.num_batches_tracked
        torch.testing.assert_close(an.norm.running_var, bn.running_var)
    assert an.fuse()(x).shape == x.shape
    gn = AttentiveNorm(8, 3, base="groupnorm", num_groups=2)
    with pytest.raises(RuntimeError, match="HxW"):
        gn(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_attention_gives_the_weights_the_site_mixes_with(training: bool) -> None:
    """``attention(x)``: the default head (meanstd pool, Linear, BatchNorm1d in evaluation,
    Hardsigmoid) computed here, in either mode of the site, updating nothing; the site's
    evaluation output is the mixture it weights. A hook on the head fires."""
    torch.manual_seed(0)
    an = AttentiveNorm(8, 3)
    with torch.no_grad():
        for _ in range(2):
            an(torch.randn(6, 8, 5, 5) * 2 + 1)  # running statistics moved
    an.train(training)
    x = torch.randn(4, 8, 5, 5) * 2 + 1
    seen = []
    an.attn.head.register_forward_hook(lambda m, i, o: seen.append(o))
    state = {k: v.clone() for k, v in an.state_dict().items()}
    lam = an.attention(x)
    head = an.attn.head
    pooled = x.mean((2, 3)) / torch.sqrt(x.var((2, 3)) + an.attn.pool.eps)
    hbn = head.norm
    z = F.linear(pooled, head.fc.weight)
    z = F.batch_norm(z, hbn.running_mean, hbn.running_var, hbn.weight, hbn.bias, eps=hbn.eps)
    torch.testing.assert_close(lam, F.hardsigmoid(z))
    assert len(seen) == 1 and an.training == training and head.training == training
    for k, v in an.state_dict().items():
        assert torch.equal(v, state[k]), k
    an.eval()
    with torch.no_grad():
        norm = an.norm
        x_hat = F.batch_norm(x, norm.running_mean, norm.running_var, eps=norm.eps)
        expected = x_hat * (lam @ an.weight)[..., None, None] + (lam @ an.bias)[..., None, None]
        torch.testing.assert_close(an(x), expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preserve_still_preserves_under_bfloat16_autocast(
    training: bool, dtype: torch.dtype
) -> None:
    """A ``preserve`` site computes its BatchNorm's output under CPU bfloat16 autocast too, in
    the dtype BatchNorm gives: its K rows differ by noise that cancels in the mixture, which
    autocast's bfloat16 matmuls left 2^-8 of (4.5e-2 relative on small activations)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(64).train(training)
    an = AttentiveNorm.from_norm(bn, 3, init="preserve").train(training)
    x = (torch.randn(4, 64, 4, 4) * 1e-3).to(dtype)
    with torch.no_grad():
        expected = copy.deepcopy(bn)(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_bn = an(x), copy.deepcopy(bn)(x)
    assert y.dtype == y_bn.dtype

    def rel(a: torch.Tensor) -> float:
        return ((a.float() - expected).abs().max() / expected.abs().max()).item()

    assert rel(y) < max(1e-4, 2 * rel(y_bn))  # (a bfloat16 output's own rounding: 2e-3)
