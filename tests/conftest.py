"""Shared test settings: deterministic, single-threaded-friendly, plain terminal output."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")
os.environ.setdefault("TERM", "dumb")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
