"""The C kernels of ``_native.c`` against float64 formulas written here, and the eval-mode
native path of AttentiveNorm against its reference path (``fused = False``)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layer_helpers import DTYPES, TOL, avx2, moments_ref, needs_native, trained

from an_search.layers import AttentiveNorm, _native
from an_search.layers._device_eval import device_eval
from an_search.layers._eval_plan import PLAN_ATTR, eval_plan
from an_search.layers.heads import HEADS

pytestmark = needs_native


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 8, 17, 49, 196, 1024, 1025, 1030])
@pytest.mark.parametrize("offset", [0.0, 3.0, 1e4])
def test_moments_match_two_pass_double(dtype: torch.dtype, n: int, offset: float) -> None:
    """15 rows: a group of eight (float32 rows up to 1024 long go eight at a time) and 7."""
    x3 = (torch.randn(3, 5, n, dtype=torch.float64) + offset).to(dtype)
    x3[0, 0] = 2.5  # a constant row: variance exactly 0
    mean, var = _native.native_moments(x3)
    mean_ref, var_ref = moments_ref(x3, 2)
    assert mean.dtype == var.dtype == dtype
    torch.testing.assert_close(mean.double(), mean_ref, **TOL[dtype])
    scale = var_ref.clamp(min=1.0 if offset else 0.0) if dtype == torch.float32 else var_ref
    assert ((var.double() - var_ref).abs() <= 3e-6 * scale + 1e-12).all()
    assert var[0, 0] == 0 and (var >= 0).all()


def test_moments_of_one_outlier_row_do_not_cancel() -> None:
    """A row far from its shift (one large value among zeros, where the shift samples it) is
    read again about its mean: no cancellation in the variance (the shifted one-pass sums
    lose ~1e-5 of it), a mean within float32 summation of the 1e4 (2e-6)."""
    x3 = torch.zeros(1, 2, 3136)
    x3[0, :, 0] = 1e4
    x3[0, 1] += torch.rand(3136)
    mean, var = _native.native_moments(x3)
    mean_ref, var_ref = moments_ref(x3, 2)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_far_from_their_shift_are_read_again_about_their_mean(dtype: torch.dtype) -> None:
    """Which passes a row takes: one; read again about the mean the first pass found (the
    shift sampled far from it); two-pass in double (NaN, where no shift helps)."""
    path = getattr(_native.library(), f"an_row_path_{_native._suffix(dtype)}")
    row = torch.rand(3136, dtype=dtype)
    assert path(row.data_ptr(), 3136) == 0
    row[0] = 1e4  # sampled by the shift: the shifted mean comes out ~ -2500, variance ~ 3e4
    assert path(row.data_ptr(), 3136) == 1
    row[5] = float("nan")
    assert path(row.data_ptr(), 3136) == 2


@pytest.mark.parametrize("n", [49, 196])
def test_short_rows_far_from_their_shift_inside_a_group_of_eight(n: int) -> None:
    """Rows 3 and 12 of 16 have large values exactly where the shift is sampled (0, n/4,
    n/2, 3n/4): the shifted sums would cancel, and those rows alone are read again."""
    x3 = torch.rand(1, 16, n)
    for row in (3, 12):
        x3[0, row, [0, n // 4, n // 2, 3 * n // 4]] = 1e4
    mean, var = _native.native_moments(x3)
    mean_ref, var_ref = moments_ref(x3, 2)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,rows", [(1, 12), (3, 12), (5, 12), (9, 12), (49, 12), (600, 12), (1, 70000), (3, 30000)]
)  # rows shorter than a vector (f32: 8, f64: 4) take plain loops, threaded from 65536 values
def test_rowwise_kernels_match_formulas(dtype: torch.dtype, n: int, rows: int) -> None:
    torch.set_num_threads(2)
    g, x = torch.randn(2, rows, n, dtype=dtype)
    a, c, d = torch.randn(3, rows, dtype=dtype)
    e = (..., None)
    torch.testing.assert_close(_native.native_affine(x, a, d), x * a[e] + d[e], **TOL[dtype])
    want = g * a[e] + x * c[e] + d[e]
    torch.testing.assert_close(_native.native_affine_grad(g, x, a, c, d), want, **TOL[dtype])
    sgx, sg = _native.native_row_dots(g, x, rows)
    torch.testing.assert_close(sgx, (g.double() * x).sum(1).to(dtype), **TOL[dtype])
    torch.testing.assert_close(sg, g.double().sum(1).to(dtype), **TOL[dtype])
    mean, var = _native.native_moments(x.view(1, rows, n))
    mean_ref, var_ref = moments_ref(x.view(1, rows, n), 2)
    torch.testing.assert_close(mean.double(), mean_ref.view(1, rows), **TOL[dtype])
    torch.testing.assert_close(var.double(), var_ref.view(1, rows), **TOL[dtype])


def test_streaming_store_rule() -> None:
    """Streaming stores only for outputs of at least 8 MiB whose rows are whole 64-byte lines."""
    big = torch.empty(2, 64, 128, 128)  # 8 MiB, rows of 64 KiB
    assert _native.native_streams(big) == avx2()
    assert not _native.native_streams(torch.empty(2, 64, 64, 64))  # 2 MiB
    assert not _native.native_streams(torch.empty(2, 1024, 49 * 21))  # 8.4 MiB, rows of 4116 B
    assert not _native.native_streams(big.view(-1)[1:].view(1, 1, -1))  # not line-aligned


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_on_streamed_outputs_match_formulas(dtype: torch.dtype) -> None:
    g, x = torch.randn(2, 2, 64, 128, 128, dtype=dtype)  # 8 MiB each in float32
    a, c, d = torch.randn(3, 2, 64, dtype=dtype)
    e = (..., None, None)
    y = _native.native_affine(x, a, d)
    assert _native.native_streams(y) == avx2()
    torch.testing.assert_close(y, x * a[e] + d[e], **TOL[dtype])
    want = g * a[e] + x * c[e] + d[e]
    torch.testing.assert_close(_native.native_affine_grad(g, x, a, c, d), want, **TOL[dtype])


def test_eval_streaming_rule() -> None:
    """The eval kernel streams outputs of at least 1 MiB whose samples are whole 64-byte lines,
    in runs of 8 rows (16 for float32 rows of odd length) that start and end on a line."""
    want = 16 if avx2() else 0
    assert _native.native_eval_streams(torch.empty(32, 512, 7, 7)) == want  # 3.1 MiB
    assert _native.native_eval_streams(torch.empty(32, 256, 14, 14)) == want // 2
    assert _native.native_eval_streams(torch.empty(4, 512, 7, 7)) == 0  # 392 KiB
    assert _native.native_eval_streams(torch.empty(256, 24, 7, 7)) == 0  # samples of 4704 B
    assert _native.native_eval_streams(torch.empty(4096, 16, 2, 2)) == 0  # rows under a vector
    big = torch.empty(32 * 256 * 196 + 1)
    assert _native.native_eval_streams(big[1:].view(32, 256, 14, 14)) == 0  # not line-aligned


# (dtype, shape, rows per streamed run): runs of 16 rows; a last run of 4 rows; float64
# vectors that straddle rows; batch 1 (each sample's runs in parallel).
_STREAMED = [
    (torch.float32, (8, 672, 7, 7), 16),
    (torch.float32, (112, 12, 14, 14), 8),
    (torch.float64, (1821, 12, 2, 3), 8),
    (torch.float32, (1, 64, 64, 64), 8),
    (torch.float64, (1, 16, 97, 88), 8),
]


@pytest.mark.parametrize("dtype,shape,group", _STREAMED)
def test_eval_path_on_streamed_outputs_matches_reference(
    dtype: torch.dtype, shape: tuple[int, ...], group: int
) -> None:
    torch.set_num_threads(2)
    an = trained(AttentiveNorm(shape[1], 5), dtype)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    with torch.no_grad():
        y = an(x)
        assert eval_plan(an, x.dtype) is not None
        assert _native.native_eval_streams(y) == (group if avx2() else 0)
        an.fused = False
        torch.testing.assert_close(y, an(x), **TOL[dtype])


def test_kernels_decline_what_they_cannot_do() -> None:
    x = torch.randn(2, 3, 8)
    assert _native.native_moments(x.half()) is None
    assert _native.native_moments(x.transpose(1, 2)) is None
    assert _native.native_affine(x, torch.ones(2, 3), torch.ones(2, 4)) is None
    assert _native.native_affine_grad(x, x.double(), *torch.ones(3, 2, 3)) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", ["meanstd", "avg"])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("batch", [1, 4])
def test_eval_path_matches_reference(head: str, pool: str, dtype: torch.dtype, batch: int) -> None:
    torch.set_num_threads(2)  # batch 1 < threads: rows in parallel; batch 4: samples
    an = trained(AttentiveNorm(16, 5, head=head, pool=pool), dtype)
    x = torch.randn(batch, 16, 6, 7, dtype=dtype) * 3 + 1
    with torch.no_grad():
        y = an(x)
        assert eval_plan(an, dtype) is not None  # the native path ran
        an.fused = False
        y_ref = an(x)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [40, 64, 100])
@pytest.mark.parametrize("k", [3, 4, 9])
@pytest.mark.parametrize("head", ["default", "mlp"])
def test_eval_head_in_row_quads_and_block_pairs(
    head: str, k: int, channels: int, dtype: torch.dtype
) -> None:
    """The head's linear layers take four rows at a time (K 3: none, 9: two quads and one
    left), the mixtures two blocks of 16 channels (40: a pair and a part block; 64: two pairs;
    100: three pairs and 4 channels); vector loops of 32 values leave 8, 0 and 4 behind."""
    torch.set_num_threads(2)
    an = trained(AttentiveNorm(channels, k, head=head), dtype)
    x = torch.randn(4, channels, 5, 3, dtype=dtype) * 3 + 1
    with torch.no_grad():
        y = an(x)
        assert eval_plan(an, dtype) is not None
        an.fused = False
        torch.testing.assert_close(y, an(x), **TOL[dtype])


def _l2_bytes() -> int:
    """This core's L2 from sysfs (glibc's sysconf reads cpuid), 1 MiB where sysfs lacks it."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        if (index / "level").read_text().strip() == "2":
            size = (index / "size").read_text().strip()
            return int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]]
    return 2**20


def test_eval_reads_ahead_only_where_two_samples_fit_in_l2() -> None:
    l2 = _l2_bytes()
    assert _native.native_eval_ahead(l2 // 2)
    assert not _native.native_eval_ahead(l2 // 2 + 1)


def test_eval_takes_small_samples_whole() -> None:
    """Samples up to 16 KiB in one step; larger ones 8 rows at a time (channels x n x size)."""
    assert _native.native_eval_rows_per_group(512, 1, 4) == 512
    assert _native.native_eval_rows_per_group(256, 16, 4) == 256  # 16 KiB
    assert _native.native_eval_rows_per_group(256, 16, 8) == 8
    assert _native.native_eval_rows_per_group(64, 65, 4) == 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ahead,whole", [(True, True), (True, False), (False, False)])
def test_eval_path_matches_reference_reading_ahead_or_not(
    dtype: torch.dtype, ahead: bool, whole: bool
) -> None:
    torch.set_num_threads(2)  # 5 samples: threads take 2 and 3, each past its first
    itemsize = torch.finfo(dtype).bits // 8
    # 16 channels of n values: 2.7 KiB for float32, 20 KiB, or over half the L2
    n = {(True, True): 42, (True, False): 20480 // (16 * itemsize)}.get((ahead, whole))
    n = n or _l2_bytes() // (2 * 16 * itemsize) + 3
    an = trained(AttentiveNorm(16, 5), dtype)
    x = torch.randn(5, 16, 1, n, dtype=dtype) * 3 + 1
    assert _native.native_eval_ahead(16 * n * itemsize) == ahead
    assert (_native.native_eval_rows_per_group(16, n, itemsize) == 16) == whole
    with torch.no_grad():
        y = an(x)
        assert eval_plan(an, dtype) is not None
        an.fused = False
        torch.testing.assert_close(y, an(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 16, 1, 1), (5, 16, 2, 2), (5, 16, 1, 3), (1, 16, 2, 1)])
def test_eval_path_on_maps_shorter_than_a_vector(shape: tuple, dtype: torch.dtype) -> None:
    """1x1 to 2x2 maps (small-image proxies' last stages): plain loops, no per-row calls."""
    torch.set_num_threads(2)
    an = trained(AttentiveNorm(16, 5), dtype)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    with torch.no_grad():
        y = an(x)
        assert eval_plan(an, dtype) is not None
        an.fused = False
        torch.testing.assert_close(y, an(x), **TOL[dtype])


@pytest.mark.parametrize("base,shape", [("batchnorm1d", (3, 16)), ("batchnorm1d", (3, 16, 9)),
                                        ("batchnorm3d", (2, 16, 3, 4, 5))])  # fmt: skip
def test_eval_path_other_ranks(base: str, shape: tuple) -> None:
    an = AttentiveNorm(16, 4, base=base).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        y = an(x)
        assert eval_plan(an, x.dtype) is not None
        an.fused = False
        torch.testing.assert_close(y, an(x), **TOL[torch.float32])


def test_eval_plan_follows_parameter_updates() -> None:
    an = trained(AttentiveNorm(8, 3), torch.float32)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        before = an(x)
        an.weight.mul_(2.0)  # in place: same storage, new version
        an.attn.head.fc.weight.add_(0.5)
        after = an(x)
        an.fused = False
        torch.testing.assert_close(after, an(x), **TOL[torch.float32])
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "SGD"])
def test_eval_plan_follows_a_fused_optimizer_step(optimizer: str) -> None:
    """Fused optimizers update parameters in place without moving their version counters: a
    model kept in eval mode while it trains (frozen norms) must not keep its old fold."""
    an = trained(AttentiveNorm(8, 3), torch.float32)
    x = torch.randn(4, 8, 5, 5)
    opt = getattr(torch.optim, optimizer)(an.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        before = an(x)  # folded and cached
    versions = [p._version for p in an.parameters()]
    an(x).square().mean().backward()  # (autograd records: the ATen ops)
    opt.step()
    assert [p._version for p in an.parameters()] == versions  # what the plan cannot see
    with torch.no_grad():
        after = an(x)
        an.fused = False
        torch.testing.assert_close(after, an(x), **TOL[torch.float32])
    assert not torch.allclose(before, after)


def _assert_follows_reference(an: AttentiveNorm, x: torch.Tensor) -> None:
    with torch.no_grad():
        y = an(x)
        an.fused = False
        torch.testing.assert_close(y, an(x), **TOL[torch.float32])
        an.fused = True


def test_eval_plan_follows_replaced_parameters_buffers_and_submodules() -> None:
    an = trained(AttentiveNorm(8, 3), torch.float32)
    x = torch.randn(2, 8, 4, 4)
    _assert_follows_reference(an, x)
    plan = eval_plan(an, x.dtype)
    an.weight = torch.nn.Parameter(an.weight.detach() * 3)  # a new Parameter object
    _assert_follows_reference(an, x)
    an.norm.running_var = an.norm.running_var * 4  # a new buffer
    _assert_follows_reference(an, x)
    an.bias.data = an.bias.data + 1  # same Parameter, new storage, same version
    _assert_follows_reference(an, x)
    fc = an.attn.head.fc
    an.attn.head.fc = torch.nn.Linear(fc.in_features, fc.out_features)  # a new submodule
    _assert_follows_reference(an, x)
    plan = eval_plan(an, x.dtype)
    assert plan is not None and eval_plan(an, x.dtype) is plan  # unchanged: cached
    assert eval_plan(an, torch.float64) is not plan  # another dtype: a plan of its own
    an.attn.head.add_module("extra", torch.nn.Identity())  # a submodule added to the head
    assert eval_plan(an, x.dtype) is not plan


def test_a_data_parallel_replica_folds_its_own_parameters() -> None:
    """``nn.DataParallel``'s replicas copy the module's ``__dict__`` (the kept CPU and device
    plans with it) and then take parameters and submodules of their own, while the original's
    dicts, which the plans' keys read, stay unchanged: a replica folds its own tensors."""
    an = trained(AttentiveNorm(8, 3), torch.float32)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        an(x), device_eval(an, x)  # both plans kept
        replica = an._replicate_for_data_parallel()  # as torch.nn.parallel.replicate does
        for key, p in an._parameters.items():
            setattr(replica, key, p.detach() * 2)  # (replicas hold plain tensors)
        ref = copy.deepcopy(an)
        ref.weight.mul_(2), ref.bias.mul_(2)
        ref.fused = False
        expected = ref(x)
        torch.testing.assert_close(replica(x), expected, **TOL[torch.float32])
        torch.testing.assert_close(device_eval(replica, x), expected, **TOL[torch.float32])
        assert eval_plan(an, x.dtype).key.structure.owner is an.__dict__  # the original's kept


def test_a_module_built_in_inference_mode_folds_at_every_call() -> None:
    """Built (or loaded) under ``torch.inference_mode``, a module's tensors are inference
    tensors: no version counter to key a plan on (reading one raises), and in-place edits in
    inference mode move nothing. The CPU and the device plans fold afresh at every call, so
    such an edit shows at once."""
    ref = trained(AttentiveNorm(8, 3), torch.float32)
    x = torch.randn(2, 8, 4, 4)
    with torch.inference_mode():
        an = AttentiveNorm(8, 3).eval()
        an.load_state_dict(ref.state_dict())
        assert an.weight.is_inference()
        outputs = [an(x), device_eval(an, x)]
        an.weight.mul_(2.0)
        an.norm.running_var.mul_(3.0)
        outputs += [an(x), device_eval(an, x)]
    with torch.no_grad():
        ref.fused = False
        before = ref(x)
        ref.weight.mul_(2.0)
        ref.norm.running_var.mul_(3.0)
        after = ref(x)
    for y, expected in zip(outputs, [before, before, after, after], strict=True):
        torch.testing.assert_close(y, expected, **TOL[torch.float32])
    assert not torch.allclose(before, after)


def test_eval_plan_follows_plain_attributes() -> None:
    """eps of the site's norm, of the pool and of the head's BatchNorm1d, and softmax's dim
    are plain attributes (no tensor version): changing one refolds the plan."""
    an = trained(AttentiveNorm(8, 3, head="bn-softmax"), torch.float32)
    x = torch.randn(2, 8, 4, 4) * 3 + 1
    _assert_follows_reference(an, x)
    plan = eval_plan(an, x.dtype)
    an.norm.eps = 0.5
    _assert_follows_reference(an, x)
    an.attn.pool.eps = 2.0
    _assert_follows_reference(an, x)
    an.attn.head.norm.eps = 3.0
    _assert_follows_reference(an, x)
    assert eval_plan(an, x.dtype) is not plan
    an.attn.head.gate.dim = 0  # softmax over the batch: no native form, the ATen path runs
    assert eval_plan(an, x.dtype) is None
    _assert_follows_reference(an, x)


def test_module_with_a_plan_copies_and_pickles() -> None:
    """The plan (ctypes) lives in the module's ``__dict__`` but not in its pickled or copied
    state; a copy builds its own, from its own tensors."""
    an = trained(AttentiveNorm(8, 3), torch.float32)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        y = an(x)
        assert PLAN_ATTR in an.__dict__
        twin = copy.deepcopy(an)
        buf = io.BytesIO()
        torch.save(an, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other in (twin, loaded):
            assert PLAN_ATTR not in other.__dict__
            torch.testing.assert_close(other(x), y, rtol=0, atol=0)
            assert eval_plan(other, x.dtype) is not eval_plan(an, x.dtype)
        twin.weight.mul_(3.0)  # the copy's tensors are its own
        torch.testing.assert_close(an(x), y, rtol=0, atol=0)
        assert not torch.allclose(twin(x), y)


def test_eval_path_is_skipped_when_it_cannot_apply() -> None:
    an = trained(AttentiveNorm(8, 3, pool="avgmax"), torch.float32)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        an(x)
    assert eval_plan(an, x.dtype) is None  # avgmax needs the max: the ATen path runs
    an = trained(AttentiveNorm(8, 3), torch.float32)
    y = an(x)  # grad enabled, parameters require grad: autograd path
    assert y.requires_grad


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_disabled_by_environment_and_layer_still_works(tmp_path) -> None:
    code = (
        "import torch; from an_search.layers import AttentiveNorm, _native\n"
        "print(_native.library(), _native.unavailable_reason())\n"
        "torch.manual_seed(0); an = AttentiveNorm(4, 2).eval(); x = torch.randn(2, 4, 3, 3)\n"
        "with torch.no_grad(): y = an(x); an.fused = False; r = an(x)\n"
        "print(torch.allclose(y, r, rtol=1e-5, atol=2e-6))\n"  # float32, two orders of ops
    )
    out = _run(code, AN_SEARCH_NATIVE="0", AN_SEARCH_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["None disabled by AN_SEARCH_NATIVE=0", "True"]
    assert not list(tmp_path.iterdir())  # nothing built


def test_builds_into_the_cache_directory(tmp_path) -> None:
    code = "from an_search.layers import _native; print(_native.unavailable_reason())"
    out = _run(code, AN_SEARCH_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("an_native-") and built[0].suffix == ".so"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dispatch_modes_see_every_op(training: bool) -> None:
    """FlopCounterMode (and any dispatch mode) must see the head's matmuls: no C path then."""
    from torch.utils.flop_counter import FlopCounterMode

    b, c, k = 2, 8, 3
    an = trained(AttentiveNorm(c, k), torch.float32).train(training)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        an(torch.randn(b, c, 4, 4))
    assert counter.get_total_flops() == 3 * (2 * b * c * k)  # head linear, lam @ Gamma, @ Beta


@pytest.mark.parametrize("head", ["default", "mlp-bn", "gn-hsigmoid"])
def test_torch_compile_calls_the_eval_operator(head: str) -> None:
    """Compiled eval graphs fold in the graph and call ``an_search::eval_site``: one graph,
    the reference's numbers."""
    torch._dynamo.reset()
    an = trained(AttentiveNorm(16, 4, head=head), torch.float32)
    x = torch.randn(3, 16, 6, 6)
    with torch.no_grad():
        explained = torch._dynamo.explain(an)(x)
        y = torch.compile(an, backend="aot_eager", fullgraph=True)(x)
        an.fused = False
        y_ref = an(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert "an_search.eval_site" in explained.graphs[0].code
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


def test_eval_operator_passes_opcheck() -> None:
    from an_search.layers._eval_plan import eval_site, fold, kernel_tensors

    an = trained(AttentiveNorm(8, 3), torch.float32)
    tensors, scalars = fold(an)
    args = (torch.randn(2, 8, 4, 4), *kernel_tensors(tensors, torch.float32))
    torch.library.opcheck(eval_site, args, scalars)
