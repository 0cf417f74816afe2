"""One worker of a parallel search: a process that shares the study through its storage.

``workers.run_workers`` starts these as ``python -m an_search.search._worker_main`` (one per
GPU group or CPU share), on this machine or, with ``an-search worker``, on others against the
same server database. Each worker runs ``study.optimize`` on its own copy of the objective (its
sampler seeded per trial from the seed and the trial's number, so no two workers propose the
same random start-up trials) until the study's shared trial budget is reached
(:class:`SharedTrialBudget`).

Ctrl-C: the first SIGINT stops the worker. If it arrives while the model trains, the training is
interrupted at once and Optuna records the trial FAIL; elsewhere (storage writes, building) the
worker finishes the step it is in and stops at the next safe point, so no write to the shared
storage is ever cut in half and no trial is left RUNNING. Later SIGINTs are ignored.

Dead workers on other machines (server databases, with Optuna's heartbeat): when its budget is
reached, a worker waits for the other workers' RUNNING trials; one whose heartbeat stops is
marked FAIL and re-queued (``storage``), and the worker runs the retry.
"""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from an_search.errors import WorkerError

from .config import SearchConfig
from .ddp import DDPObjective
from .objective import INTERRUPTED, TRIAL_ERRORS, Objective
from .storage import count_trials, heartbeat_enabled
from .study import prepare_search, quiet_optuna

__all__ = ["SharedTrialBudget", "count_trials", "run_worker"]

_DRAIN_POLL_S = 2.0


class SharedTrialBudget:
    """Optuna callback: stop this worker once the study holds ``limit`` counted trials.

    Like ``optuna.study.MaxTrialsCallback(limit, states=None)``, but a retried FAIL trial is not
    counted twice and the worker does not stop while trials wait in the queue (baselines,
    retries). Several workers may each start one more trial at the same instant, so a study can
    end up to ``workers - 1`` trials over ``limit``.

    With ``call``, ``limit`` counts only the trials that call's workers ran (``an-search worker
    --n-trials N`` adds N trials, however many other processes add meanwhile), and the queue
    does not hold the workers back: its trials are the other calls' too.

    Args:
        limit: total counted trials of the study (None: no limit).
        stop: also stop when this returns True (e.g. a Ctrl-C arrived).
        call: the id this call's workers record with their trials (``storage.record_worker``).
    """

    def __init__(
        self,
        limit: int | None,
        stop: Callable[[], bool] = lambda: False,
        call: str | None = None,
    ) -> None:
        self.limit, self.stop, self.call = limit, stop, call

    def reached(self, study: optuna.Study) -> bool:
        """Whether the budget is used up (and, without ``call``, nothing waits in the queue)."""
        if self.stop():
            return True
        if self.limit is None:
            return False
        trials = study.get_trials(deepcopy=False)
        if self.call is not None:
            return count_trials(trials, call=self.call) >= self.limit
        waiting = any(t.state == TrialState.WAITING for t in trials)
        return not waiting and count_trials(trials) >= self.limit

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.reached(study):
            study.stop()


class _SigintGuard:
    """SIGINT interrupts training only; elsewhere it is noted and acted on at a safe point."""

    def __init__(self) -> None:
        self.armed = False
        self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one is enough: cleanup runs uncut
        self.pending = True
        if self.armed:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    @contextmanager
    def training(self) -> Iterator[None]:
        self.check()
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def wrap(self, objective: Objective) -> None:
        """Make ``objective``'s training interruptible, but not its per-epoch storage writes."""
        inner = objective.run_training

        def run_training(trial: optuna.trial.Trial, built: Any, on_epoch: Any) -> Any:
            def guarded(epoch: int, top1: float, top5: float) -> bool:
                self.armed = False  # trial.report / should_prune write to the storage
                try:
                    stop = on_epoch(epoch, top1, top5)
                finally:
                    self.armed = True
                self.check()
                return stop

            try:
                with self.training():
                    return inner(trial, built, guarded)
            except KeyboardInterrupt:  # later SIGINTs are ignored: this write is not cut
                trial.set_user_attr("fail_reason", INTERRUPTED)
                raise

        objective.run_training = run_training  # type: ignore[method-assign]


def run_worker(
    cfg: SearchConfig,
    *,
    limit: int | None,
    nproc: int = 1,
    sync_bn: bool = False,
    guard: _SigintGuard | None = None,
    call: str | None = None,
) -> optuna.Study:
    """Run one worker in this process until the shared budget, the timeout, or a Ctrl-C.

    Args:
        cfg: the search settings; ``storage`` must be one that several processes may share.
        limit: total counted trials of the study (:func:`count_trials`), or with ``call`` of
            that call's workers; None: no limit.
        nproc: processes per trial; > 1 trains each trial under torchrun (:mod:`.ddp`).
        sync_bn: SyncBatchNorm in those trials (CUDA only).
        guard: SIGINT handling (installed by :func:`main`); None: Ctrl-C as usual.
        call: the id of the worker call this process belongs to (see :class:`SharedTrialBudget`).

    Raises:
        KeyboardInterrupt: after a Ctrl-C, once the running trial is recorded FAIL.
    """
    guard = guard or _SigintGuard()
    make = partial(DDPObjective, nproc=nproc, sync_bn=sync_bn) if nproc > 1 else Objective
    with quiet_optuna(), ExitStack() as hold:  # (hold: SQLite's one-writer lock)
        objective, study = prepare_search(cfg, make_objective=make, processes=nproc, hold=hold)
        guard.check()
        guard.wrap(objective)
        objective.call = call
        budget = SharedTrialBudget(limit, stop=lambda: guard.pending, call=call)
        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        catch = (*TRIAL_ERRORS, WorkerError)
        while not guard.pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if not budget.reached(study):
                study.optimize(objective, timeout=left, callbacks=[budget], catch=catch)
            if not heartbeat_enabled(study) or not _drain(study, guard, deadline):
                break
        guard.check()
    return study


def _drain(study: optuna.Study, guard: _SigintGuard, deadline: float | None) -> bool:
    """Wait for other workers' RUNNING trials; True when a retry of a dead one is queued."""
    while not guard.pending and (deadline is None or time.monotonic() < deadline):
        with warnings.catch_warnings():  # experimental since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # heartbeat silent: FAIL + retry
        states = {t.state for t in study.get_trials(deepcopy=False)}
        if TrialState.WAITING in states:
            return True
        if TrialState.RUNNING not in states:
            return False
        time.sleep(_DRAIN_POLL_S)
    return False
