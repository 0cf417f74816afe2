"""Shared settings for the search tests: a tiny, fast proxy on the embedded Animal-MNIST."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from an_search.train import TrainConfig

TINY_TRAIN = {
    "epochs": 3,
    "batches_per_epoch": 6,
    "batch_size": 16,
    "img_size": 32,
    "val_fraction": 0.05,  # 100 validation images: an epoch takes about a second on one core
    "threads": 1,
}


@pytest.fixture(scope="session")
def tiny_train() -> Callable[..., TrainConfig]:
    """Factory: 3 epochs x 6 updates of 16 images at 32x32, one thread; keywords override."""
    return lambda **overrides: TrainConfig(**{**TINY_TRAIN, **overrides})


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Two cores shared by several jobs: more than one intra-op thread thrashes (20x slower).
    torch.set_num_threads(1)
