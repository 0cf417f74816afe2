"""The layer tests' common helpers: a trained AttentiveNorm, whether the CPU has AVX2, and what
the C kernels' tests share (their skip mark, dtypes, tolerances, two-pass moments). The tests
import it by name: pytest puts tests/layers (no __init__.py) on sys.path."""

from __future__ import annotations

import pytest
import torch

from an_search.layers import AttentiveNorm, _native

needs_native = pytest.mark.skipif(
    _native.library() is None, reason=f"native kernels: {_native.unavailable_reason()}"
)
DTYPES = [torch.float32, torch.float64]
TOL = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-13},
}


def moments_ref(x3: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dim`` of a 3d tensor, two-pass in float64."""
    xd = x3.double()
    mean = xd.sum(dim, keepdim=True) / xd.shape[dim]
    var = ((xd - mean) ** 2).sum(dim) / xd.shape[dim]
    return mean.squeeze(dim), var


def trained(an: AttentiveNorm, dtype: torch.dtype, dims: int = 2) -> AttentiveNorm:
    """``an`` in ``dtype`` after three training-mode forwards of (8, C, 5, ...) maps with
    ``dims`` spatial dims (running statistics of the norm and the head moved), then eval."""
    an.to(dtype).train()
    with torch.no_grad():
        for _ in range(3):
            an(torch.randn(8, an.num_features, *(5,) * dims, dtype=dtype) * 2 + 0.5)
    return an.eval()


def avx2() -> bool:
    """Whether this CPU has AVX2 and FMA (the kernels' streaming stores need them)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "fma" in flags
