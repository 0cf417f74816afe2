"""Layer tests run on tiny tensors: one intra-op thread avoids OpenMP barrier stalls when the
machine's cores are shared, and is faster than two for tensors this small."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
