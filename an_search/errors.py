"""One exception hierarchy for every user-facing failure.

Each error's message is a single line that names the problem and the fix; the CLI prints it and
exits with code 2. Library code raises these and never prints or exits.
"""

from __future__ import annotations

__all__ = [
    "ANSearchError",
    "BudgetError",
    "CheckpointError",
    "DataError",
    "InvalidKError",
    "MAX_K",
    "ModelConfigError",
    "NoSitesSelectedError",
    "NonFiniteLossError",
    "OutputDirError",
    "RecipeError",
    "SpaceError",
    "StorageError",
    "TrainConfigError",
    "UnknownModelError",
    "UnknownNameError",
    "WorkerError",
]


class ANSearchError(Exception):
    """Base class: a bad input or environment that the user can fix. Message is one line."""


class UnknownModelError(ANSearchError, ValueError):
    """A model name timm does not know."""


class UnknownNameError(ANSearchError, ValueError):
    """A registry name (head, pool, placement, norm) that does not exist."""


MAX_K = 1024
"""The largest K accepted anywhere (the paper's are 5 to 20; a site holds 2 x K x C mixtures)."""


class InvalidKError(ANSearchError, ValueError):
    """K outside 1..MAX_K, or a per-stage K list whose length does not match the model's stages."""


class ModelConfigError(ANSearchError, ValueError):
    """Model options that cannot work (an image size below 1, a built model that disagrees)."""


class NoSitesSelectedError(ANSearchError, ValueError):
    """A placement, pattern or filter that selects no normalization site."""


class CheckpointError(ANSearchError):
    """A checkpoint file that is missing, corrupt, or does not match the model."""


class OutputDirError(ANSearchError):
    """An output directory that cannot be written."""


class RecipeError(ANSearchError):
    """A recipe or saved model directory that cannot be read."""


class SpaceError(ANSearchError, ValueError):
    """A search space file with unknown keys, bad values, or no valid configuration."""


class TrialParamsError(ANSearchError, ValueError):
    """A trial's parameters (one enqueued by hand, say) that the search space cannot take."""


class DataError(ANSearchError):
    """A dataset path or layout that cannot be used for training."""


class StorageError(ANSearchError):
    """An Optuna storage that cannot be opened."""


class BudgetError(ANSearchError):
    """A cost budget that no configuration can meet."""


class WorkerError(ANSearchError):
    """A worker process, or the torchrun ranks of a trial, that cannot start or that died."""


class TrainConfigError(ANSearchError, ValueError):
    """A training setting out of range (epochs < 1, train_fraction outside (0, 1], ...)."""


class NonFiniteLossError(ANSearchError, FloatingPointError):
    """The training loss became NaN or infinite; training stopped at that update.

    Attributes:
        epoch: 1-based epoch in which it happened.
        step: 1-based update within that epoch.
        history: per-epoch records of the epochs completed before it.
    """

    def __init__(
        self, message: str, *, epoch: int = 0, step: int = 0, history: list | None = None
    ) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.history = list(history or [])
