"""bench/_timing.py's confidence interval of a median against the binomial law written here."""

from __future__ import annotations

import importlib.util
import random
from math import comb
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_timing", Path(__file__).parents[1] / "bench" / "_timing.py"
)
timing = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(timing)


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) = P(k <= #values below the median <= n - k)."""
    return sum(comb(n, j) for j in range(k, n - k + 1)) / 2**n


@pytest.mark.parametrize("n", [6, 9, 15, 24, 41])
def test_median_ci_is_the_narrowest_order_statistics_that_cover(n: int) -> None:
    values = random.Random(n).sample(range(1000), n)
    lo, hi = timing.median_ci([float(v) for v in values])
    ordered = sorted(values)
    k = ordered.index(lo) + 1
    assert hi == ordered[n - k]
    assert _coverage(n, k) >= 0.95 > _coverage(n, k + 1)


def test_median_ci_needs_enough_values() -> None:
    assert timing.median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 5 values cover 94% at best
    assert timing.median_ci([1.0, 2.0, 3.0, 4.0, 5.0], level=0.9) == (1.0, 5.0)


def test_paired_ratio_ci_formats_the_ratios_interval() -> None:
    a, b = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [1.0, 1.0, 2.0, 2.0, 2.0, 4.0]  # ratios 2,4,3,4,5,3
    assert timing.paired_ratio_ci(a, b) == "[2.000-5.000]"
    assert timing.paired_ratio_ci(a[:5], b[:5]) == "[n/a]"


@pytest.mark.parametrize("script", ["an_layer.py", "models.py", "profile_step.py", "site_host.py"])
def test_a_gpu_benchmark_on_a_machine_without_cuda_is_a_usage_error(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run as the script runs (``runpy`` as ``__main__``, bench/ on sys.path; in this process:
    a subprocess would spend its seconds importing torch): argparse's exit 2, no exception."""
    import runpy
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bench = Path(__file__).parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.setattr(sys, "argv", [str(bench / script), "--device", "cuda"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(bench / script), run_name="__main__")
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--device cuda: no CUDA device here" in last
