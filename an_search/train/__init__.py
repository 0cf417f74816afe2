"""Proxy and full training on timm.data: datasets, loaders, the training loop, checkpoints."""

from __future__ import annotations

from an_search.train.checkpoint import load_checkpoint, save_checkpoint
from an_search.train.config import TrainConfig, TrainResult
from an_search.train.data import EMBEDDED_ROOT, DataSpec, resolve_data
from an_search.train.loaders import Loaders, check_batches, create_loaders
from an_search.train.proxy import proxy_train

__all__ = [
    "EMBEDDED_ROOT",
    "DataSpec",
    "Loaders",
    "TrainConfig",
    "TrainResult",
    "check_batches",
    "create_loaders",
    "load_checkpoint",
    "proxy_train",
    "resolve_data",
    "save_checkpoint",
]
