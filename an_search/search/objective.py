"""One trial: sample a configuration, build it, check the budget, reuse a duplicate, or train.

The order matters: the cost is measured on the converted model before any training; an
over-budget trial ends COMPLETE with top-1 0 and a violated constraint (``trial.set_constraint``,
so ``best_trial``, TPE and NSGA-II treat it as infeasible) after zero training steps; a
configuration that builds the same model as a finished trial reuses that trial's result.

User attributes of a trial (what reports read):
    baseline (``bn``/``paper``, enqueued trials only), worker, config (``convert()`` arguments),
    config_key, recipe (``Recipe.to_dict()``), n_sites, params, macs, cost_input_size, latency_ms,
    infeasible (violated budgets), duplicate_of, history (per epoch: top1, top5, train_loss, ...),
    top1, top5 (COMPLETE only), steps, train_s, wall_s, prune_reason, fail_reason.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from an_search.errors import (
    ANSearchError,
    InvalidKError,
    NonFiniteLossError,
    NoSitesSelectedError,
    RecipeError,
    TrialParamsError,
    UnknownNameError,
)
from an_search.rewrite import SiteReport
from an_search.train import DataSpec, TrainResult, proxy_train
from an_search.train.proxy import OnEpoch

from .build import Built, build_model, cost_input_size, model_latency_ms
from .config import SearchConfig
from .sampling import BASELINES, config_key, enqueue_baselines, sample_recipe
from .space import SearchSpace
from .storage import fail_dead_worker_trials, heartbeat_enabled, record_worker

__all__ = ["TRIAL_ERRORS", "Objective"]

#: Errors that fail one trial (recorded as ``fail_reason``) without stopping the study: a
#: configuration the converter refuses, parameters the space cannot take (enqueued by hand),
#: or a configuration too large for the GPU.
TRIAL_ERRORS: tuple[type[BaseException], ...] = (
    InvalidKError,
    NoSitesSelectedError,
    UnknownNameError,
    RecipeError,
    TrialParamsError,
    torch.cuda.OutOfMemoryError,
)
#: The ``fail_reason`` of a trial cut by Ctrl-C.
INTERRUPTED = "interrupted by SIGINT (Ctrl-C)"
_SCALE = {"macs": 1e-9, "params": 1e-6, "latency": 1.0}  # objective values: GMACs, M, ms
_COST_KEY = {"macs": "macs", "params": "params", "latency": "latency_ms"}
_WAIT_POLL_S = 2.0
_BUILD_POLL_S = 0.25
_BUILD_WAIT_S = 120.0  # an earlier trial silent this long without a key: its worker is gone
#: A RUNNING trial that recorded no worker this long after it started is no an-search trial (a
#: user's ``study.ask()``, another tool's): not waited for. Its age is the older of two clocks:
#: its start (another machine's clock, which may be skewed) and when this process first saw it
#: unclaimed, so that a start time that looks too young costs no more than this.
_UNCLAIMED_S = 30.0
_FIRST_SEEN: dict[tuple[str, int, object], float] = {}  # (study, number, start) -> monotonic


class Objective:
    """The callable ``study.optimize`` runs (one instance per search).

    Args:
        cfg: the search settings.
        objectives: validated objective names (``top1`` first).
        space: the validated space.
        report: the unconverted model's sites.
        data: the resolved dataset.
    """

    def __init__(
        self,
        cfg: SearchConfig,
        objectives: tuple[str, ...],
        space: SearchSpace,
        report: SiteReport,
        data: DataSpec,
    ) -> None:
        self.cfg, self.objectives, self.space = cfg, objectives, space
        self.report, self.data = report, data
        self.budgets = cfg.budgets()
        #: called as progress(done_updates, total_updates) while a trial trains (None: off)
        self.progress: Callable[[int, int], None] | None = None
        #: the worker call this objective runs for, recorded with each trial (None: none)
        self.call: str | None = None

    def __call__(self, trial: optuna.trial.Trial) -> float | list[float]:
        try:
            return self._run(trial)
        except BaseException as exc:  # (Optuna ends it FAIL: say why, as for TRIAL_ERRORS)
            if not isinstance(exc, optuna.TrialPruned):
                reason = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else _reason(exc)
                with contextlib.suppress(Exception):  # (the error to raise is exc, not this)
                    if "fail_reason" not in trial.user_attrs:  # (TRIAL_ERRORS', a guard's)
                        trial.set_user_attr("fail_reason", reason)
            raise

    def _run(self, trial: optuna.trial.Trial) -> float | list[float]:
        start = time.perf_counter()
        record_worker(trial, self.call)
        baseline = trial.user_attrs.get("baseline")
        try:
            config = self._config(trial, baseline)
            trial.set_user_attr("config", config)
            built = self.build(config)
        except TRIAL_ERRORS as exc:  # this configuration only: the study goes on
            trial.set_user_attr("fail_reason", _reason(exc))
            raise
        recipe = built.recipe.to_dict()
        key = config_key(recipe)
        cost = _first_measured(trial, key) or {
            **built.cost,
            "latency_ms": model_latency_ms(self.cfg, self.data, built.model),
        }
        for name, value in {**cost, "recipe": recipe, "config_key": key}.items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("n_sites", len(recipe["sites"]))
        trial.set_user_attr("cost_input_size", list(cost_input_size(self.cfg, self.data)))

        over = self._set_constraints(trial, cost)
        if over:
            trial.set_user_attr("infeasible", over)
            return self._finish(trial, start, 0.0, cost, steps=0)
        earlier = self._finished_twin(trial, key)
        if earlier is not None:
            return self._reuse(trial, start, earlier, cost)
        return self._train(trial, start, replace(built, cost=cost), baseline is not None)

    def _config(self, trial: optuna.trial.Trial, baseline: str | None) -> dict[str, Any]:
        """The trial's ``convert()`` arguments: a baseline's, or sampled from the space."""
        if baseline:
            if baseline not in BASELINES:
                raise TrialParamsError(
                    f"unknown baseline {baseline!r} (known: {', '.join(BASELINES)})"
                )
            config = dict(BASELINES[baseline])
            inits = self.space.init.values()  # (a constant, or a categorical of one choice)
            if baseline == "paper" and len(inits) == 1 and inits[0] is not None:
                config["init"] = inits[0]  # (as the sampled trials start: compared alike)
            return config
        try:
            return sample_recipe(trial, self.space, self.report)
        except ANSearchError:
            raise
        except ValueError as exc:  # Optuna's: an enqueued value outside the space, or another
            # distribution stored under one of the space's names
            raise TrialParamsError(
                f"the trial's parameters do not fit the space: {exc}".splitlines()[0]
            ) from None

    def build(self, config: dict[str, Any]) -> Built:
        """Build the model ``config`` describes and count it (see :func:`build_model`); its
        latency is timed only if no earlier trial of the study has timed the same model."""
        return build_model(self.cfg, self.data, config, latency=False)

    def run_training(
        self, trial: optuna.trial.Trial, built: Built, on_epoch: OnEpoch
    ) -> TrainResult:
        """Proxy-train ``built.model`` in this process (``ddp.DDPObjective``: under torchrun)."""
        return proxy_train(
            built.model, self.data, self.cfg.train, on_epoch=on_epoch, progress=self.progress
        )

    def _values(self, top1: float, cost: dict[str, float]) -> float | list[float]:
        if len(self.objectives) == 1:
            return top1
        return [top1] + [cost[_COST_KEY[o]] * _SCALE[o] for o in self.objectives[1:]]

    def _set_constraints(self, trial: optuna.trial.Trial, cost: dict[str, float]) -> list[str]:
        """One constraint per budget: cost / limit - 1 (> 0 = over). Returns the budgets broken."""
        over = []
        for name, limit in self.budgets.items():
            excess = cost[name] / limit - 1.0
            trial.set_constraint(f"max_{name}", excess)
            if excess > 0:
                over.append(name)
        return over

    def _finish(
        self,
        trial: optuna.trial.Trial,
        start: float,
        score: float,
        cost: dict[str, float],
        **attrs: Any,
    ) -> float | list[float]:
        """Record ``attrs`` and the wall time; return the objective values for top-1 ``score``."""
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("wall_s", time.perf_counter() - start)
        return self._values(score, cost)

    def _finished_twin(
        self, trial: optuna.trial.Trial, key: str
    ) -> optuna.trial.FrozenTrial | None:
        """The earliest finished trial that trained the same model (waits for a running one).

        With several workers, an earlier trial may still be building its model and not have
        recorded its key yet: it may be this very configuration, so wait (at most
        ``_BUILD_WAIT_S``) until it has. Keys are recorded before this check, so of two twins
        the later one always sees the earlier one and only the earlier one trains. A twin whose
        worker dies while this one waits is failed here (its process gone from this host, or
        its heartbeat stale on a server database), and this one trains.
        """
        study = trial.study
        since = time.monotonic()
        while True:
            earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
            twins = [
                t
                for t in earlier
                if t.user_attrs.get("config_key") == key
                and "infeasible" not in t.user_attrs
                and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            ]
            finished = [t for t in twins if t.state != TrialState.RUNNING]
            if finished:
                return min(finished, key=lambda t: t.number)
            building = [
                t
                for t in earlier
                if t.state == TrialState.RUNNING
                and "config_key" not in t.user_attrs
                and ("worker" in t.user_attrs or _unclaimed_age(study, t) < _UNCLAIMED_S)
            ]
            if not twins and (not building or time.monotonic() - since > _BUILD_WAIT_S):
                return None
            # another worker is training it (or building one that may be it): wait
            time.sleep(_WAIT_POLL_S if twins else _BUILD_POLL_S)
            _fail_stale(study)

    def _reuse(
        self,
        trial: optuna.trial.Trial,
        start: float,
        earlier: optuna.trial.FrozenTrial,
        cost: dict[str, float],
    ) -> float | list[float]:
        origin = earlier.user_attrs.get("duplicate_of", earlier.number)
        trial.set_user_attr("duplicate_of", origin)
        history = earlier.user_attrs.get("history", [])
        if len(self.objectives) == 1:  # TPE ranks a pruned twin by its last reported epoch
            for record in history:
                trial.report(record["top1"], record["epoch"])
        if earlier.state == TrialState.PRUNED:
            reason = f"same model as trial {origin}, which was pruned"
            self._finish(trial, start, 0.0, cost, history=history, steps=0, prune_reason=reason)
            raise optuna.TrialPruned(reason)
        top1 = earlier.user_attrs.get("top1", earlier.values[0])
        return self._finish(trial, start, top1, cost, history=history, top1=top1, steps=0)

    def _train(
        self, trial: optuna.trial.Trial, start: float, built: Built, is_baseline: bool
    ) -> float | list[float]:
        single = len(self.objectives) == 1
        epochs = self.cfg.train.epochs
        history: list[float] = []
        pruned: list[str] = []

        def on_epoch(epoch: int, top1: float, top5: float) -> bool:
            history.append(top1)
            if not single:  # Optuna cannot prune (or take reports of) multi-objective trials
                return False
            trial.report(top1, epoch)
            if epoch >= epochs:  # the full result costs nothing more to keep
                return False
            # Baselines are asked too, so their values enter Hyperband's rungs, but never
            # pruned: every report compares against them.
            if not trial.should_prune() or is_baseline:
                return False
            pruned.append(f"hyperband at epoch {epoch}/{epochs}: top1 {top1:.2f} below its rung")
            return True

        try:
            result = self.run_training(trial, built, on_epoch)
        except NonFiniteLossError as exc:
            self._finish(trial, start, 0.0, built.cost, history=exc.history, prune_reason=str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        attrs = {"history": result.history, "steps": result.steps, "train_s": result.wall_s}
        if pruned:
            self._finish(trial, start, 0.0, built.cost, prune_reason=pruned[0], **attrs)
            raise optuna.TrialPruned(pruned[0])
        attrs.update(top1=result.top1, top5=result.top5)
        return self._finish(trial, start, result.top1, built.cost, **attrs)


def _unclaimed_age(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> float:
    """Seconds a RUNNING trial has gone without recording a worker (see ``_UNCLAIMED_S``)."""
    key = (study.study_name, trial.number, trial.datetime_start)  # (one trial, in any storage)
    seen = _FIRST_SEEN.setdefault(key, time.monotonic())
    age = time.monotonic() - seen
    if trial.datetime_start is not None:  # (Optuna's: local and naive)
        age = max(age, (datetime.now() - trial.datetime_start).total_seconds())
    return age


def _first_measured(trial: optuna.trial.Trial, key: str) -> dict[str, float] | None:
    """The cost the study's first trial of this model recorded (None: none has): one model,
    one cost (a twin's own latency differs by the noise, and would put it on or off a front,
    or a budget, alone), and no time spent timing it again."""
    for t in trial.study.get_trials(deepcopy=False):
        if t.number < trial.number and t.user_attrs.get("config_key") == key:
            if all(name in t.user_attrs for name in _COST_KEY.values()):
                return {name: t.user_attrs[name] for name in _COST_KEY.values()}
    return None


def _reason(exc: BaseException) -> str:
    """A failed trial's ``fail_reason``: the error's type and first line."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _fail_stale(study: optuna.Study) -> None:
    """Fail the trials whose worker died: on this host (its recorded process is gone) and, on a
    server database, by Optuna's heartbeat; their retries are queued as at a trial's start."""
    if fail_dead_worker_trials(study, unowned=False):  # (a dead baseline: queued again)
        enqueue_baselines(study)
    if heartbeat_enabled(study):
        with warnings.catch_warnings():  # experimental since Optuna 2.9, still in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
