"""bench/profile_step.py's arithmetic: the union of kernel intervals, the launch count and the
AN model's extra by name, against independent computations written here."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(_BENCH))  # profile_step imports its siblings as the scripts do
_SPEC = importlib.util.spec_from_file_location("bench_profile", _BENCH / "profile_step.py")
prof = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = prof  # (its dataclass looks its module up there)
_SPEC.loader.exec_module(prof)


def test_union_length_counts_overlaps_once() -> None:
    rng = random.Random(0)
    for _ in range(50):
        spans = []
        for _ in range(rng.randint(0, 8)):
            start = rng.randint(0, 90)
            spans.append((start, start + rng.randint(0, 15)))
        covered = {t for a, b in spans for t in range(a, b)}  # unit cells [t, t + 1)
        assert prof.union_length(spans) == len(covered)


def test_profile_step_counts_each_op_of_a_step() -> None:
    x = torch.randn(64, 64)

    def step() -> None:  # three ops that compute, and one view (not counted)
        torch.mm(x, x).add_(1.0).relu_().view(-1)

    r = prof.profile_step(step, steps=4, device=torch.device("cpu"))
    assert r.launches == 3
    assert {"aten::mm", "aten::add_", "aten::relu_"} <= set(r.by_name)
    assert r.wall > 0 and r.device > 0
    assert 0 < r.host <= r.wall and r.syncs == 0  # (host: each call's return, before its sync)


def test_sync_calls_counts_the_hosts_waits() -> None:
    cpu, cuda = prof.DeviceType.CPU, prof.DeviceType.CUDA
    events = [
        SimpleNamespace(name=n, device_type=d)
        for n, d in [
            ("cudaStreamSynchronize", cpu), ("cudaDeviceSynchronize", cpu),
            ("cudaLaunchKernel", cpu),
            ("Memcpy DtoH (Device -> Pageable)", cuda), ("Memcpy HtoD (Pageable -> Device)", cuda),
            ("aten::add", cpu), ("void at::native::reduce_kernel<...>", cuda),
            ("cudaEventSynchronize", cpu),
        ]
    ]  # fmt: skip
    assert prof.sync_calls(events) == 4  # three synchronisations and the copy to the host


def test_extra_ranks_the_names_by_the_gap() -> None:
    base = prof.StepProfile(1.0, 0.5, 3, {"conv": 0.4, "bn": 0.1})
    an = prof.StepProfile(1.2, 0.7, 6, {"conv": 0.41, "bn": 0.05, "moments": 0.2, "mm": 0.04})
    gaps = prof.extra(an, base, top=3)
    assert [n for n, _ in gaps] == ["moments", "mm", "conv"]
    assert abs(gaps[0][1] - 0.2) < 1e-12 and abs(gaps[2][1] - 0.01) < 1e-12
    base.host_by_name, an.host_by_name = {"cudaLaunchKernel": 1e-3}, {"cudaLaunchKernel": 3e-3}
    an.host_by_name["cuLaunchKernelEx"] = 1.5e-3
    host = prof.extra(an, base, top=2, of="host_by_name")
    assert [n for n, _ in host] == ["cudaLaunchKernel", "cuLaunchKernelEx"]
    assert abs(host[0][1] - 2e-3) < 1e-12


def test_site_host_noop_times_the_triton_sites_host_work() -> None:
    """bench/site_host.py --noop (in its own process: it replaces the kernels for good) runs the
    Triton site's forward and training step with kernels that launch nothing, and times them;
    with ``--base HEAD`` (in a git checkout) HEAD's package beside this tree's, interleaved."""
    import subprocess  # noqa: PLC0415

    root = _BENCH.parent
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True)
    base = ["--base", "HEAD"] if git.returncode == 0 else []
    out = subprocess.run(
        [sys.executable, str(_BENCH / "site_host.py"), "--noop", "--calls", "5", "--repeats",
         "3", "--batch", "4", "--channels", "16", "--size", "3", "--k", "3", *base],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line}
    assert set(rows) == {"forward", "step"} and all(float(r[1]) > 0 for r in rows.values())
    if base:  # ... base <us> this/base <ratio> [lo-hi]
        assert all(r[4] == "base" and float(r[5]) > 0 and float(r[7]) > 0 for r in rows.values())


@pytest.mark.parametrize("package", [False, True], ids=["kernels", "package"])
def test_native_ab_builds_the_base_and_times_both(package: bool) -> None:
    """bench/native_ab.py builds HEAD's C kernels (``--package``: imports HEAD's whole package)
    beside this tree's, checks that both give the same site output and input gradient (the
    script asserts it) and prints a row per (shape, mode, K); with ``--package --model``, the
    timm model converted by either package, a row per mode."""
    import subprocess  # noqa: PLC0415

    from an_search.layers import _native  # noqa: PLC0415

    root = _BENCH.parent
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True)
    if git.returncode != 0 or _native.library() is None:
        pytest.skip("needs a git checkout and the C kernels")
    script = [sys.executable, str(_BENCH / "native_ab.py"), *(["--package"] if package else [])]
    out = subprocess.run(
        [*script, "--shapes", "16x3,32x2", "--ks", "3", "--batch", "4", "--repeats", "3",
         "--calls", "2", "--modes", "eval", "train"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("Package: " if package else "C kernels: ")
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    assert [r[:3] for r in rows] == [
        [s, m, "3"] for s in ("16x3", "32x2") for m in ("eval", "train")
    ]
    assert all(float(v) > 0 for r in rows for v in r[3:6])  # BN, this, base: us a call
    if package:
        out = subprocess.run(
            [*script, "--model", "resnet10t", "--placement", "all", "--img-size", "32",
             "--batch", "2", "--classes", "10", "--repeats", "2", "--modes", "train", "infer"],
            capture_output=True, text=True, timeout=300, check=True,
        ).stdout  # fmt: skip
        rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
        assert [r[:2] for r in rows] == [["resnet10t", "train"], ["resnet10t", "infer"]]
        assert all(float(v) > 0 for r in rows for v in r[2:5])


def test_models_times_both_modes_and_refuses_graphs_off_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/models.py prints a row per mode with both models' times and the paired ratio, and
    with ``--fused`` a row for the folded AN model in inference; ``--cuda-graphs`` off a GPU is
    a usage error (exit 2), not a traceback."""
    import runpy  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    cmd = [sys.executable, str(_BENCH / "models.py"), "--model", "resnet10t", "--se-model",
           "none", "--placement", "all", "--img-size", "32", "--batch", "2", "--classes", "10",
           "--repeats", "2", "--warmup", "1", "--device", "cpu"]  # fmt: skip
    out = subprocess.run(
        [*cmd, "--fused"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert set(rows) == {"train", "inference", "an-resnet10t-fused"}  # (fused: inference only)
    for line in (rows["train"], rows["inference"]):
        cells = line.split("|")[0].split()
        assert float(cells[-5]) > 0 and float(cells[-2]) > 0  # resnet10t, an-resnet10t ms
        assert float(line.split("AN/BN")[1].split("x")[0]) > 0
    assert out.splitlines()[-1] == rows["an-resnet10t-fused"]  # right after the inference row
    assert float(rows["an-resnet10t-fused"].split("AN/AN-fused")[1].split("x")[0]) > 0
    monkeypatch.setattr(sys, "argv", [*cmd[1:], "--cuda-graphs"])  # (in this process: runpy)
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(cmd[1], run_name="__main__")
    assert (
        refused.value.code == 2 and "--cuda-graphs needs --device cuda" in capsys.readouterr().err
    )


def test_data_open_times_a_scanned_and_a_kept_tar_index(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/data_open.py (in this process, as its ``__main__``): both rows and their ratio."""
    import runpy  # noqa: PLC0415

    script = str(_BENCH / "data_open.py")
    monkeypatch.setattr(sys, "argv", [script, "--repeats", "2"])
    runpy.run_path(script, run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["scanned", "kept", "scanned/kept"]
    assert all(float(line.split()[1]) > 0 for line in lines[:2])
    assert float(lines[2].split()[1].rstrip("x")) > 0 and lines[2].endswith("[n/a]")
