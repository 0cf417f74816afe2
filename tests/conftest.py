"""Shared test settings: deterministic, single-threaded-friendly, plain terminal output."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")
os.environ.setdefault("TERM", "dumb")


def _no_cuda() -> bool:
    import torch  # (does not import triton)

    return not torch.cuda.is_available()


# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors
# (tests/layers/test_triton_site.py). Triton reads this when it is first imported, so it is set
# here, before any test imports it; with a GPU the kernels are compiled (tests/test_cuda.py).
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
