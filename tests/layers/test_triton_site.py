"""The Triton site (``_triton_kernels.py``, ``_triton_site.py``) against the reference path.

Run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``
before Triton is imported where there is no GPU): the same kernels a GPU compiles, executed
block by block with numpy. The reference is
the module's own reference path (inner BatchNorm module, head modules, autograd) in float64:
outputs, the input's and all six parameters' gradients, the running statistics and counters of
the site and the head, over training and evaluation steps."""

from __future__ import annotations

import copy
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from an_search.layers import AttentiveNorm

triton = pytest.importorskip("triton")
_site_mod = importlib.import_module("an_search.layers._triton_site")
triton_site = _site_mod.triton_site
HEADS = list(__import__("an_search.layers.heads", fromlist=["HEADS"]).HEADS)  # all eight


if not triton.knobs.runtime.interpret:  # tests/conftest.py sets it where there is no GPU
    pytest.skip("Triton compiles for the GPU here: tests/test_cuda.py", allow_module_level=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _compare_steps(
    an: AttentiveNorm,
    shape: tuple[int, ...],
    modes: tuple[bool, ...],
    block_c: int | None = 16,
    dtype: torch.dtype = torch.float32,
    tol: float = 1e-5,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> None:
    """Run ``an`` through the Triton site and a float64 copy through its reference path, one
    step per entry of ``modes`` (True: training), comparing everything after each step."""
    ref = copy.deepcopy(an).double()
    ref.fused = False
    for training in modes:
        an.train(training)
        ref.train(training)
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        xa = x.to(dtype).contiguous(memory_format=memory_format).requires_grad_()
        xr = xa.detach().double().requires_grad_()
        y = triton_site(an, xa, block_c=block_c)
        assert y is not None and y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=memory_format)
        y_ref = ref(xr)
        assert _rel(y, y_ref) < tol
        g = torch.randn_like(x)
        y.backward(g.to(dtype))  # (a contiguous gradient also for a channels-last output)
        y_ref.backward(g)
        assert _rel(xa.grad, xr.grad) < 20 * tol
        for (name, p), p_ref in zip(an.named_parameters(), ref.parameters(), strict=True):
            assert _rel(p.grad, p_ref.grad) < 20 * tol, name
            p.grad = p_ref.grad = None
        for (name, b), b_ref in zip(an.named_buffers(), ref.buffers(), strict=True):
            if b.is_floating_point():
                assert _rel(b, b_ref) < tol, name
            else:
                assert int(b) == int(b_ref), name


@pytest.mark.parametrize("pool", ["meanstd", "avg", "avgmax"])
@pytest.mark.parametrize("head", HEADS)
def test_matches_reference_over_train_and_eval(head: str, pool: str) -> None:
    torch.manual_seed(0)
    an = AttentiveNorm(37, 5, head=head, pool=pool)  # 3 blocks of 16 channels, the last partial
    _compare_steps(an, (6, 37, 5, 3), (True, True, False))


@pytest.mark.parametrize("head", ["default", "gn-hsigmoid"])
def test_every_eps_is_used(head: str) -> None:
    """eps large enough to matter beyond the tolerance: site norm, pool, head norm."""
    torch.manual_seed(6)
    an = AttentiveNorm(20, 4, head=head, eps=0.3)
    an.attn.pool.eps = 0.7
    an.attn.head.norm.eps = 0.5
    _compare_steps(an, (4, 20, 3, 3), (True, False))


def test_cumulative_momentum_large_k_and_one_block() -> None:
    torch.manual_seed(1)
    an = AttentiveNorm(24, 20, momentum=None)  # K 20: a 32-wide block, 12 padded
    an.attn.head.norm.momentum = None
    _compare_steps(an, (3, 24, 4, 4), (True, True, True, False), block_c=None)
    assert int(an.norm.num_batches_tracked) == int(an.attn.head.norm.num_batches_tracked) == 3


@pytest.mark.parametrize("shape", [(5, 12), (5, 12, 9)])
def test_batchnorm1d_inputs(shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    an = AttentiveNorm(12, 4, base="batchnorm1d")
    _compare_steps(an, shape, (True, False), tol=2e-5)  # (B, C): one position a channel


@pytest.mark.parametrize("head", ["default", "linear-sigmoid"])
def test_channels_last_maps(head: str) -> None:
    torch.manual_seed(7)
    an = AttentiveNorm(37, 5, head=head)  # 37 channels: two tiles of 32, the last partial
    _compare_steps(an, (3, 37, 5, 6), (True, False), memory_format=torch.channels_last)


def test_avgmax_with_ties_channels_last() -> None:
    """Rows whose maximum occurs several times: amax shares the gradient among them."""
    torch.manual_seed(9)
    an = AttentiveNorm(37, 5, pool="avgmax")
    ref = copy.deepcopy(an).double()
    ref.fused = False
    x = torch.randn(3, 37, 4, 5).round()  # integers: ties at the maximum in most rows
    xa = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xr = x.double().requires_grad_()
    assert (x.flatten(2) == x.flatten(2).amax(2, keepdim=True)).sum(2).max() > 1
    y, y_ref = triton_site(an, xa), ref(xr)
    assert _rel(y, y_ref) < 1e-5
    g = torch.randn_like(x)
    y.backward(g)
    y_ref.backward(g.double())
    assert _rel(xa.grad, xr.grad) < 1e-4


def test_channels_last_3d_maps() -> None:
    torch.manual_seed(8)
    an = AttentiveNorm(12, 4, base="batchnorm3d")
    fmt = torch.channels_last_3d
    _compare_steps(an, (3, 12, 3, 4, 5), (True, False), memory_format=fmt)


def test_without_running_statistics() -> None:
    torch.manual_seed(3)
    an = AttentiveNorm(20, 3, track_running_stats=False)  # batch statistics in eval too
    _compare_steps(an, (4, 20, 6, 6), (True, False))


def test_bfloat16_feature_maps() -> None:
    torch.manual_seed(4)
    an = AttentiveNorm(16, 4)
    _compare_steps(an, (4, 16, 8, 8), (True, False), dtype=torch.bfloat16, tol=1e-2)


def test_no_grad_eval_matches_the_cpu_eval_kernel() -> None:
    torch.manual_seed(5)
    an = AttentiveNorm(40, 6).eval()
    x = torch.randn(3, 40, 7, 7)
    with torch.no_grad():
        y = triton_site(an, x)
        y_ref = an(x)  # the CPU path (C kernel or ATen)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def _declined(an: nn.Module, x: torch.Tensor) -> bool:
    return triton_site(an, x) is None


def test_declines_what_it_does_not_cover() -> None:
    x = torch.randn(4, 16, 3, 3)
    assert _declined(AttentiveNorm(16, 4, base="groupnorm", num_groups=4), x)
    odd = AttentiveNorm(16, 4, head="linear-sigmoid")
    odd.attn.head.gate = nn.Tanh()  # not one of the three gates
    assert _declined(odd, x)
    odd.attn.head = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Sigmoid())  # ReLU, no layer 2
    assert _declined(odd, x)
    odd.attn.head = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4), nn.Sigmoid())  # no ReLU
    assert _declined(odd, x)
    odd.attn.head = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8), nn.Sigmoid())
    assert _declined(odd, x)
    an = AttentiveNorm(16, 4)
    assert _declined(an, x.double())
    assert _declined(an, x.transpose(2, 3))  # not contiguous
    assert _declined(an, torch.randn(1, 16, 3, 3))  # the head's BatchNorm1d raises itself
    assert _declined(AttentiveNorm(16, 65), x)  # K above 64
    assert _declined(an, torch.randn(129, 16, 2, 2))  # batch above 128
    assert not _declined(an, x)


def test_description_is_kept_until_what_it_read_changes() -> None:
    """The site's description is kept between calls and built again for another shape or
    layout of the input, a mode or submodule change, and a parameter's dtype moved by
    ``.data`` (which no version counter or identity shows)."""
    spec = importlib.import_module("an_search.layers._triton_spec")
    an = AttentiveNorm(16, 4)
    x = torch.randn(4, 16, 3, 3)
    s = spec.site(an, x, None)
    assert s is not None and not s.use_running and s.params[0] is an.weight
    assert spec.site(an, torch.randn(4, 16, 3, 3), None) is s  # kept
    assert spec.site(an, torch.randn(4, 16, 5, 5), None).n == 25
    assert spec.site(an, x.contiguous(memory_format=torch.channels_last), None).cl
    assert spec.site(an, x.transpose(2, 3), None) is None  # neither layout
    an.norm.eval()
    assert spec.site(an, x, None).use_running
    an.norm.train()
    an.attn.head.fc = nn.Linear(16, 4, bias=True)
    s = spec.site(an, x, None)
    assert s.layers[0].bias is an.attn.head.fc.bias and s.params[3] is an.attn.head.fc.bias
    an.attn.head.fc.weight.data = an.attn.head.fc.weight.data.double()
    assert spec.site(an, x, None) is None  # float32 parameters only
    an.attn.head.fc.weight.data = an.attn.head.fc.weight.data.float()
    assert spec.site(an, x, None) is not None
    an.refresh()
    assert spec.SITE_ATTR not in an.__dict__
    spec.site(an, x, None)
    assert spec.SITE_ATTR not in copy.deepcopy(an).__dict__  # nor pickled
    replica = an._replicate_for_data_parallel()  # nn.DataParallel's: the __dict__ copied
    for key, p in an._parameters.items():
        setattr(replica, key, p.detach().clone())  # (replicas hold plain tensors)
    assert spec.SITE_ATTR in replica.__dict__
    assert spec.site(replica, x, None).params[0] is replica.weight


def test_switch_attribute_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    an = AttentiveNorm(16, 4)  # (forward calls _forward_triton for CUDA inputs only)
    x = torch.randn(4, 16, 3, 3)
    monkeypatch.delenv(_site_mod.ENV, raising=False)
    before = int(an.norm.num_batches_tracked)
    assert an._forward_triton(x) is not None  # by default in training
    assert int(an.norm.num_batches_tracked) == before + 1  # the kernels counted the batch
    an.eval()
    assert an._forward_triton(x) is None  # ... and not in evaluation (the folded site)
    monkeypatch.setenv(_site_mod.ENV, "1")
    assert an._forward_triton(x) is not None  # "1": evaluation too
    an.train()
    monkeypatch.setenv(_site_mod.ENV, "0")
    assert an._forward_triton(x) is None  # "0": never
    an.triton = True  # the attribute wins over the environment
    assert an._forward_triton(x) is not None
    monkeypatch.setenv(_site_mod.ENV, "1")
    an.triton = False
    assert an._forward_triton(x) is None
    an.triton = True
    an.fused = False
    assert an._forward_triton(x) is None


def test_frozen_inner_batchnorm_in_a_training_site() -> None:
    """``norm.eval()`` in a training site: the kernels normalise with the running statistics
    and leave them (and the counter) alone, as the reference module does; gradients agree."""
    an = AttentiveNorm(16, 4)
    with torch.no_grad():
        for _ in range(2):
            triton_site(an, torch.randn(6, 16, 3, 3) * 2 + 1)  # statistics != init
    an.norm.eval()
    ref = copy.deepcopy(an).double()
    ref.fused = False
    running = [b.clone() for b in an.norm.buffers()]
    x = (torch.randn(6, 16, 3, 3) * 3 - 1).requires_grad_()
    xr = x.detach().double().requires_grad_()
    y, yr = triton_site(an, x), ref(xr)
    assert y is not None and _rel(y, yr) < 1e-5
    g = torch.randn_like(yr)
    y.backward(g.float())
    yr.backward(g)
    assert _rel(x.grad, xr.grad) < 1e-5 and _rel(an.weight.grad, ref.weight.grad) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(an.norm.buffers(), running, strict=True))


def test_default_needs_ampere_or_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default only GPUs of compute capability 8.0 and up take the kernels (built for sm_80
    and sm_90); the attribute and the environment still choose on any GPU."""
    wanted, cuda = _site_mod.triton_wanted, torch.device("cuda", 0)
    monkeypatch.delenv(_site_mod.ENV, raising=False)
    for capability, default in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, c=capability: c)
        _site_mod._ampere_on.cache_clear()
        assert wanted(None, True, cuda) is default, capability
        assert wanted(None, False, cuda) is False  # evaluation: the folded site
        assert wanted(True, False, cuda) is True and wanted(False, True, cuda) is False
        monkeypatch.setenv(_site_mod.ENV, "1")
        assert wanted(None, True, cuda) is True
        monkeypatch.delenv(_site_mod.ENV)
    _site_mod._ampere_on.cache_clear()


def test_running_statistics_writes_are_recorded() -> None:
    """The kernels write the site's and the head's running statistics through pointers; their
    version counters move as BatchNorm's own update moves them (the eval plans refold on it),
    and not in evaluation, where nothing is written."""
    an = AttentiveNorm(16, 4)
    x = torch.randn(4, 16, 3, 3)
    bufs = [an.norm.running_mean, an.norm.running_var, an.norm.num_batches_tracked,
            an.attn.head.norm.running_var, an.attn.head.norm.num_batches_tracked]  # fmt: skip
    before = [t._version for t in bufs]
    assert triton_site(an, x) is not None
    assert [t._version for t in bufs] == [v + 1 for v in before]
    an.eval()
    assert triton_site(an, x) is not None
    assert [t._version for t in bufs] == [v + 1 for v in before]


def test_every_variant_compiles_for_the_gpu() -> None:
    """The real compiler (NVIDIA backend and ptxas ship with Triton), no GPU: every kernel
    variant the site launches over all heads, pools, modes, layouts and dtypes, for sm_90,
    none spilling registers to local memory (cuobjdump's STACK)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    script = Path(__file__).with_name("triton_aot.py")
    out = subprocess.run(
        [sys.executable, str(script), "--resources"], env=env, cwd=root, capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    found = re.search(r"compiled (\d+) variants of (\d+) kernels", out.stdout)
    assert found and int(found[1]) > 50 and int(found[2]) == 12, out.stdout
    usage = re.findall(r"REG +(\d+) STACK +(\d+) +(.*)", out.stdout)
    assert len(usage) == int(found[1])
    assert all(stack == "0" for _, stack, _ in usage), [u for u in usage if u[1] != "0"]
