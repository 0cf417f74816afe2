"""The layer tests' common helpers: a trained AttentiveNorm, and whether the CPU has AVX2."""

from __future__ import annotations

import torch

from an_search.layers import AttentiveNorm


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
