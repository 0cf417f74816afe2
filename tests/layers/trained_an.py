"""The layer tests' common setup: an AttentiveNorm whose running statistics are not their init."""

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
