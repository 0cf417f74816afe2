"""Trials trained under ``torchrun``: this process drives Optuna, G ranks train (DESIGN point 10).

The driver is the only process that talks to Optuna: ``study.optimize`` here asks for the
trial, :class:`DDPObjective` builds and measures the model as usual, then
``an_search.train.distributed.train_distributed`` trains it in ``nproc`` torchrun processes
(NCCL on GPUs, gloo on CPU). After each epoch rank 0 sends the validation top-1 here; the
objective's ``on_epoch`` reports it to the trial and asks the pruner, and the verdict goes back
to rank 0, which broadcasts it to every rank. Nothing runs ``study.optimize`` on the ranks.

    >>> from functools import partial
    >>> objective, study = prepare_search(cfg, make_objective=partial(DDPObjective, nproc=4))
    >>> study.optimize(objective, n_trials=20)
"""

from __future__ import annotations

from typing import Any

import optuna

from an_search.errors import WorkerError
from an_search.train import TrainResult
from an_search.train.distributed import train_distributed
from an_search.train.proxy import OnEpoch

from .build import Built
from .objective import Objective

__all__ = ["DDPObjective"]


class DDPObjective(Objective):
    """An :class:`Objective` whose proxy training runs as ``nproc`` torchrun processes.

    Args:
        *args: as :class:`Objective` (cfg, objectives, space, report, data).
        nproc: processes per trial (GPUs of the worker's group on CUDA); ``cfg.train.batch_size``
            is per process, so the global batch is ``batch_size * nproc`` and the learning rate
            scales with it.
        sync_bn: SyncBatchNorm through ``an_search.layers.convert_sync_batchnorm`` (CUDA only).
        **kwargs: as :class:`Objective`.

    A trial whose ranks fail (a crash, out of memory on one GPU) ends FAIL with its
    ``fail_reason``; a non-finite loss ends it pruned, as in one process. Attribute ``ddp``:
    nproc, sync_bn, global_batch, and rank_epochs (epochs each rank trained).
    """

    def __init__(self, *args: Any, nproc: int, sync_bn: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nproc, self.sync_bn = nproc, sync_bn

    def run_training(
        self, trial: optuna.trial.Trial, built: Built, on_epoch: OnEpoch
    ) -> TrainResult:
        train = self.cfg.train
        threads = None if train.threads is None else max(1, train.threads // self.nproc)
        info = {
            "nproc": self.nproc,
            "sync_bn": self.sync_bn,
            "global_batch": train.batch_size * self.nproc,
        }
        trial.set_user_attr("ddp", info)
        try:
            run = train_distributed(
                built.model,
                built.recipe,
                self.data,
                train,
                nproc=self.nproc,
                on_epoch=on_epoch,
                sync_bn=self.sync_bn,
                threads=threads,
            )
        except WorkerError as exc:  # this trial only: recorded, and the study goes on
            trial.set_user_attr("fail_reason", str(exc))
            raise
        trial.set_user_attr("ddp", info | {"rank_epochs": [r["epochs"] for r in run.ranks]})
        return run.result
