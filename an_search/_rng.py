"""The caller's random states, kept across library calls that seed for reproducibility."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["kept_rng"]


@contextmanager
def kept_rng() -> Iterator[None]:
    """Run the block with Python's, numpy's and torch's global random states saved, and put
    them back after it, however it ends.

    Searches and retraining seed these generators (every trial and epoch, so that results
    repeat); a caller's own sequence, in a notebook or a script, must go on as if they had not
    run. torch's CUDA generators are kept too when CUDA is already in use.
    """
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
