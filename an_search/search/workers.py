"""Several worker processes on one machine sharing one study (DESIGN points 9 and 10).

    >>> study = run_workers(SearchConfig("resnet18", n_trials=40), gpus=[0, 1, 2, 3])

The parent checks everything once (space, data, budgets, storage), creates or resumes the study
and enqueues the baselines, then starts one ``python -m an_search.search._worker_main`` process
per worker (``worker.run_worker``). Placement:

- GPUs: ``gpus`` split into groups of ``gpus_per_trial``; worker i sees group ``i % groups``
  only (``CUDA_VISIBLE_DEVICES``) and trains on ``cuda``; with ``gpus_per_trial`` > 1 each trial
  runs under torchrun on its group (:mod:`.ddp`).
- CPU: the cores this process may use are split between the workers (``sched_setaffinity``),
  and each worker sets its torch threads to its share, or fewer where ``TrainConfig.threads``
  or the user's ``OMP_NUM_THREADS`` say so (:func:`._procs.worker_threads`); without GPUs,
  ``gpus_per_trial`` > 1 means gloo processes per trial.

Storage: the workers write concurrently, so never SQLite: a journal file
(``JournalFileBackend``) on one machine, a server database for several. With no storage given
the run directory's ``study.log`` journal is used; an explicit SQLite storage is refused.

Progress: the parent polls the storage and calls ``on_trial(study, trial)`` once for every trial
that finishes, whichever worker ran it. A worker that dies loses only its running trial: the
parent marks it FAIL (its process is gone) and the others go on.

Ctrl-C: SIGINT to the parent (or the terminal's, which reaches every worker) stops each worker
at a safe point (``worker``: an interrupted training ends its trial FAIL); a worker that does not
stop within a minute is terminated; then every trial still RUNNING from a dead worker is marked
FAIL, so no trial is left RUNNING, and ``KeyboardInterrupt`` is raised.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from an_search.errors import StorageError, TrainConfigError

from ._procs import OnTrial, check_exits, report_finished, start_worker, watch_workers
from .config import SearchConfig
from .space import load_space
from .storage import (
    DEFAULT_DB_NAME,
    DEFAULT_JOURNAL_NAME,
    fail_dead_worker_trials,
    resolve_storage_url,
)
from .study import prepare_search, quiet_optuna, trial_limit
from .worker import SharedTrialBudget

__all__ = ["WorkerPlan", "plan_workers", "run_workers"]


@dataclass(frozen=True)
class WorkerPlan:
    """Where one worker runs: its CPU ids, its GPU ids (None on CPU), processes per trial."""

    index: int
    cpus: tuple[int, ...]
    gpus: tuple[int, ...] | None
    nproc: int


def plan_workers(
    n_workers: int | None,
    gpus: Sequence[int] | None = None,
    gpus_per_trial: int = 1,
    cpus: Sequence[int] | None = None,
) -> list[WorkerPlan]:
    """Assign GPU groups and CPU shares to workers.

    Args:
        n_workers: workers to start; None: one per GPU group (one on CPU).
        gpus: GPU ids to use; None: CPU only.
        gpus_per_trial: GPUs (on CPU: gloo processes) per trial.
        cpus: CPU ids to share out; None: those this process may run on.

    Raises:
        TrainConfigError: a count below 1, or GPUs that do not split into groups.
    """
    for name, value in (("n_workers", n_workers), ("gpus_per_trial", gpus_per_trial)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise TrainConfigError(f"{name} must be at least 1, got {value!r}")
    groups: list[tuple[int, ...] | None] = [None]
    if gpus is not None:
        if not gpus or len(gpus) % gpus_per_trial:
            raise TrainConfigError(
                f"{len(gpus)} GPUs do not split into groups of {gpus_per_trial}: "
                "give a multiple of --gpus-per-trial GPUs"
            )
        ids = tuple(gpus)
        groups = [ids[i : i + gpus_per_trial] for i in range(0, len(ids), gpus_per_trial)]
    n = n_workers or len(groups)
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cpus = cpus or list(range(os.cpu_count() or 1))
    cpus = list(cpus)
    share = max(1, len(cpus) // n)
    plans = []
    for i in range(n):  # more workers than cores: one core each, shared round-robin
        mine = cpus[i * share : (i + 1) * share] if n <= len(cpus) else [cpus[i % len(cpus)]]
        plans.append(WorkerPlan(i, tuple(mine), groups[i % len(groups)], gpus_per_trial))
    return plans


def run_workers(
    cfg: SearchConfig,
    n_workers: int | None = None,
    *,
    gpus: Sequence[int] | None = None,
    gpus_per_trial: int = 1,
    sync_bn: bool = False,
    join: bool = False,
    on_trial: OnTrial | None = None,
    on_message: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
) -> optuna.Study:
    """Run (or resume, or join) a search with several worker processes; return the study.

    Args:
        cfg: the search settings. ``n_trials``: the trials this call adds, shared by all its
            workers (``worker.SharedTrialBudget``); without ``join`` the study's total is then
            its trials so far plus ``n_trials``, which trials from other processes (joining
            workers) help reach; with ``join``, this call's own trials. With ``join`` and no
            ``n_trials``, the total the study's creator set.
        n_workers: worker processes; None: one per GPU group, or one on CPU.
        gpus: GPU ids (e.g. ``[0, 1, 2, 3]``); None: CPU.
        gpus_per_trial: GPUs per trial (torchrun/DDP above 1); on CPU, gloo processes.
        sync_bn: SyncBatchNorm in DDP trials (CUDA only).
        join: the study exists already (another machine created it): do not set its total.
        on_trial: ``on_trial(study, trial)`` in this process for every trial that finishes.
        on_message: one-line notices (storage switched, a worker died).
        poll_s: seconds between looks at the storage.

    Raises:
        KeyboardInterrupt: after Ctrl-C, once every worker stopped and no trial is RUNNING.
        StorageError: SQLite given for several workers; storage errors.
        WorkerError: every worker failed (the first one's message).
        TrainConfigError, BudgetError, SpaceError, DataError...: bad input, before any worker.
    """
    plans = plan_workers(n_workers, gpus, gpus_per_trial)
    space_name = load_space(cfg.space).name
    run_dir = Path(cfg.run_dir(space_name)).resolve()  # made once every check passed
    url, note = _shared_storage(cfg, run_dir, len(plans), join)
    cfg = replace(cfg, storage=url, output_dir=str(run_dir), space=_absolute(cfg.space))
    if sync_bn and gpus is None:
        raise TrainConfigError("SyncBatchNorm needs CUDA (torch rejects CPU tensors): give --gpus")
    here = cfg  # the parent measures the unconverted model where the workers will train
    if gpus is not None:
        here = replace(cfg, train=replace(cfg.train, device="cuda"))
    with quiet_optuna(), ExitStack() as hold:  # (a SQLite study's lock: its one worker's next)
        _, study = prepare_search(here, on_message=on_message, processes=plans[0].nproc, hold=hold)
        limit = trial_limit(study, cfg, join=join)
    if note is not None and on_message is not None:  # (once the input passed every check)
        on_message(note)
    if limit is None and cfg.timeout is None and join:
        raise StorageError(
            f"study {study.study_name} stores no trial total (its run gave no --n-trials): give "
            "the worker --n-trials or --timeout"
        )
    call = uuid.uuid4().hex if join and cfg.n_trials is not None else None  # its own trials
    if SharedTrialBudget(limit, call=call).reached(study):  # e.g. joining a study that is done
        if on_message is not None:
            on_message(f"study {study.study_name} already holds its {limit} trials")
        return study
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    folder = run_dir / "workers"
    procs = [start_worker(cfg, plan, limit, sync_bn, folder, call) for plan in plans]
    interrupted = watch_workers(study, procs, seen, on_trial, poll_s)
    fail_dead_worker_trials(study)  # a worker killed mid-trial: its trial ends FAIL
    report_finished(study, seen, on_trial)
    if interrupted:
        raise KeyboardInterrupt
    check_exits(procs, plans, on_message)
    return study


def _shared_storage(
    cfg: SearchConfig, run_dir: Path, n: int, join: bool = False
) -> tuple[str, str | None]:
    """The storage the workers share, and a note when it is not the one the user named."""
    url = resolve_storage_url(cfg.storage, run_dir)
    if n == 1 or not url.startswith("sqlite"):
        return url, None
    if join:  # (a journal would hold another study, not this one)
        raise StorageError(
            f"SQLite takes one writer, so {n} workers cannot share {url}: join its study with "
            "one worker (--workers 1), or give the next study a journal file (--storage "
            "FILE.log) or a server (postgresql://...)"
        )
    if cfg.storage is not None or os.environ.get("OPTUNA_STORAGE"):
        raise StorageError(
            f"SQLite takes one writer, so {n} workers cannot share {url}: use a journal file "
            "(--storage FILE.log) or a server (postgresql://...), which hold a study of their own"
        )
    if (run_dir / DEFAULT_DB_NAME).exists():  # a journal next to it would be a second study
        new = "--output DIR" if cfg.output_dir is not None else "--study-name NAME or --output DIR"
        raise StorageError(
            f"{run_dir} holds a study in SQLite, which takes one writer, so {n} workers cannot "
            f"share it: run that study with one process (no --workers or --gpus), or give the "
            f"workers a new study in another run directory ({new})"
        )
    journal = str(run_dir / DEFAULT_JOURNAL_NAME)
    return journal, f"{n} workers share the study through the journal file {journal}"


def _absolute(space: Any) -> Any:
    path = Path(str(space))
    return str(path.resolve()) if path.is_file() else space  # (a file, whatever its name)
