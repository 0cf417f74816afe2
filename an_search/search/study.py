"""The study: create or resume it, enqueue the baselines, run the trials.

    >>> study = run_search(SearchConfig("resnet18", n_trials=20))

Sampler and pruner: one objective uses TPE (seeded, group-decomposed for the conditional
parameters; budgets reach it as trial constraints) with Hyperband pruning on the per-epoch
validation top-1; several objectives use NSGA-II and no pruner (Optuna cannot prune
multi-objective studies), with a message saying so. The sampler is seeded afresh for each trial
from ``seed`` and the trial's number (``_seeding``): a study resumed or split over calls proposes
what one uninterrupted call would have, given the same trials so far.

Baselines: the unconverted model (``baseline=bn``) and the paper's placement (``baseline=paper``)
are enqueued once per study, ahead of any sampled trial; one is enqueued again only when no trial
of it is waiting, running or finished (e.g. it was killed). They are trained in full, never pruned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from an_search._rng import kept_rng
from an_search.errors import BudgetError, StorageError
from an_search.input_size import check_input_fits
from an_search.rewrite import find_sites
from an_search.train import check_batches, resolve_data

from ._files import make_dir
from ._lock import sqlite_writer_lock
from ._open import open_study, study_storage_url
from ._resume import check_same_data, check_same_search, data_summary
from ._seeding import PerTrialSeedSampler
from ._weights import check_same_weights, weights_summary
from .build import build_model
from .config import OBJECTIVES, SearchConfig, parse_objectives
from .objective import TRIAL_ERRORS, Objective
from .report import check_report_dir
from .sampling import BASELINES, check_space, enqueue_baselines
from .space import SearchSpace, load_space
from .storage import (
    DEFAULT_DB_NAME,
    check_sqlite_writer,
    count_trials,
    fail_dead_worker_trials,
    open_storage,
    resolve_storage_url,
)

__all__ = [
    "NO_PRUNING_MESSAGE",
    "create_or_load_study",
    "data_summary",
    "open_study",
    "prepare_search",
    "quiet_optuna",
    "run_search",
    "study_storage_url",
    "trial_limit",
]

NO_PRUNING_MESSAGE = (
    "pruning is off: Optuna cannot prune multi-objective studies, so NSGA-II trains every "
    "trial to the end (use --objectives top1 with budgets to prune)"
)
Callback = Callable[[optuna.Study, FrozenTrial], None]


def create_or_load_study(
    cfg: SearchConfig,
    *,
    space: SearchSpace | None = None,
    data: dict[str, Any] | None = None,
    hold: ExitStack | None = None,
) -> tuple[optuna.Study, str | None]:
    """Open the storage, create or resume the study, fail dead workers' trials, enqueue baselines.

    Args:
        cfg: the search settings.
        space: the loaded space (None: ``load_space(cfg.space)``).
        data: what the trials train on (:func:`data_summary`): stored with a new study, and
            compared with a resumed one's (None: neither).
        hold: where the study is a SQLite file's, its one-writer lock (:mod:`._lock`) is taken
            before the storage is opened and entered into ``hold``, which releases it when it
            closes (the caller's search ends); None: no lock.

    Returns:
        The study and a message for the user (why pruning is off), or None.

    Raises:
        StorageError: the storage cannot be opened, or holds this study name for another model,
            other objectives, settings or data, or another process runs it (SQLite).
        SpaceError, UnknownNameError: a bad space, objective or pruner name.
    """
    cfg.validate()  # (before the storage gets the study)
    objectives = parse_objectives(cfg.objectives)
    space = space or load_space(cfg.space)
    name = cfg.resolved_study_name(space.name)
    run_dir = cfg.run_dir(space.name)
    check_report_dir(run_dir, name)  # before a trial: its report would replace another's
    url = resolve_storage_url(cfg.storage, run_dir)
    storage = None
    lock = None if hold is None else sqlite_writer_lock(url, name)  # (once its folder exists)
    if url == f"sqlite:///{(run_dir / DEFAULT_DB_NAME).resolve()}" or (
        "://" not in url and Path(url).parent == Path(run_dir).resolve()
    ):  # the default database, or the workers' journal: the run directory's own
        if hold is not None and lock is not None and Path(run_dir).is_dir():
            hold.enter_context(lock)  # (before a search that is creating it is read)
            lock = None
        storage = open_storage(url) if Path(url.removeprefix("sqlite:///")).is_file() else None
        others = [n for n in optuna.get_all_study_names(storage) if n != name] if storage else []
        if others:  # (report.json, checked above, is written only by the CLI)
            raise StorageError(
                f"run directory {run_dir} holds study {others[0]!r}; a run directory holds one "
                "study: give this one another (--output)"
            )
        make_dir(run_dir)
    if hold is not None and lock is not None:
        hold.enter_context(lock)
    directions = [OBJECTIVES[o][1] for o in objectives]
    study = _open_or_create(storage or open_storage(url), name, directions)
    check_sqlite_writer(study)
    check_same_search(study, cfg, objectives, space)
    weights = weights_summary(cfg.checkpoint)
    check_same_data(study, data)  # (what the study's creator stored: workers joining it
    check_same_weights(study, weights)  # while its trials still wait are checked too)
    trials = study.get_trials(deepcopy=False)
    if all(t.state == TrialState.WAITING for t in trials):
        # (one from before these were stored, with trials run on unknown ones, stays unchecked)
        if data is not None and "data" not in study.user_attrs:
            study.set_user_attr("data", data)
        if "weights" not in study.user_attrs:
            study.set_user_attr("weights", weights)
    n_before = len(trials)
    study.sampler, study.pruner, message = _sampler_pruner(cfg, objectives)
    if n_before == 0:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVES[o][0] for o in objectives])
        study.set_user_attr("model", cfg.model)
        study.set_user_attr("objectives", list(objectives))
        study.set_user_attr(
            "space", {"name": space.name, "source": space.source, "text": space.text}
        )
        study.set_user_attr("config", cfg.to_dict())
    fail_dead_worker_trials(study)
    enqueue_baselines(study)
    return study, message


def _open_or_create(
    storage: optuna.storages.BaseStorage, name: str, directions: list[str]
) -> optuna.Study:
    """Load the study when it exists, else create it.

    ``create_study(load_if_exists=True)`` alone would append a second "create study" record
    to a journal on every resume, refused or not; loading first writes nothing.
    """
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # (a worker that starts at the same time may create it first)
        return optuna.create_study(
            storage=storage, study_name=name, load_if_exists=True, directions=directions
        )


def run_search(
    cfg: SearchConfig,
    *,
    callbacks: Sequence[Callback] = (),
    on_message: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> optuna.Study:
    """Run (or resume) a search and return its study.

    Everything that can be checked before training is: the space against the model's sites, the
    data, and the budgets against the unconverted model (AN only adds cost, so a budget the
    unconverted model breaks cannot be met).

    Args:
        cfg: the search settings.
        callbacks: passed to ``study.optimize`` (progress bars, ``MaxTrialsCallback``...).
        on_message: receives one-line notices (e.g. why pruning is off); the library never prints.
        progress: called as progress(done, total) with the current trial's training updates.

    The caller's random states (Python's, numpy's, torch's) are put back afterwards: trials
    seed them, so that results repeat.

    Raises:
        BudgetError: a params or MACs budget below the unconverted model's (before any
            training; a latency budget is left to the trials: one timing is too noisy to refuse
            a run on, and a folded AN site may time as fast as BatchNorm).
        TrainConfigError: a setting of a wrong type or out of range (before anything is stored).
        StorageError, SpaceError, DataError, UnknownModelError, UnknownNameError: bad input.
    """
    from .worker import SharedTrialBudget  # (worker.py builds on this module)

    with quiet_optuna(), kept_rng(), ExitStack() as hold:  # (hold: SQLite's one-writer lock)
        objective, study = prepare_search(cfg, on_message=on_message, hold=hold)
        limit = trial_limit(study, cfg, join=False)  # the total `an-search worker` stops at
        objective.progress = progress
        study.optimize(
            objective,
            n_trials=cfg.n_trials,
            timeout=cfg.timeout,
            # (workers that joined share the total: their trials count too)
            callbacks=[*callbacks, SharedTrialBudget(limit)],
            catch=TRIAL_ERRORS,
        )
    return study


def prepare_search(
    cfg: SearchConfig,
    *,
    on_message: Callable[[str], None] | None = None,
    make_objective: Callable[..., Objective] = Objective,
    processes: int = 1,
    hold: ExitStack | None = None,
) -> tuple[Objective, optuna.Study]:
    """Check everything that can be checked before training, then create or resume the study.

    :func:`run_search` is this plus ``study.optimize``; parallel workers (``workers``) call it
    once in the parent (checks, baselines) and once in each worker.

    Args:
        cfg: the search settings.
        on_message: receives one-line notices (why pruning is off).
        make_objective: builds the objective from ``(cfg, objectives, space, report, data)``
            (e.g. a ``functools.partial`` of a subclass that trains under torchrun).
        processes: processes per trial (torchrun ranks), each of which needs a full batch.
        hold: receives a SQLite study's one-writer lock (see :func:`create_or_load_study`).

    Raises:
        TrainConfigError, BudgetError, StorageError, SpaceError, DataError, UnknownModelError,
        UnknownNameError, ModelConfigError (an image size the model cannot run).
    """
    cfg.validate()  # (before anything is built on its device, or stored)
    space = load_space(cfg.space)
    data = resolve_data(None if cfg.data is None else str(cfg.data), name=cfg.dataset)
    train = cfg.train
    images = check_batches(
        data, train.batch_size, train_fraction=train.train_fraction, seed=train.seed,
        processes=processes,
    )  # fmt: skip
    objectives = parse_objectives(cfg.objectives)
    unconverted = build_model(cfg, data, BASELINES["bn"], latency=False)
    _check_budgets(cfg, unconverted.cost)
    if cfg.cost_img_size not in (None, train.img_size):  # (else the cost's forward checked it)
        check_input_fits(unconverted.model, (data.in_chans, train.img_size, train.img_size))
    report = find_sites(unconverted.model)
    check_space(space, report)
    objective = make_objective(cfg, objectives, space, report, data)
    study, message = create_or_load_study(
        cfg, space=space, data=data_summary(data, *images), hold=hold
    )
    for note in (message, data.unseen_note()):
        if note and on_message is not None:
            on_message(note)
    return objective, study


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's own log lines (it prints every trial to stderr) for the block.

    The library never prints: trial outcomes reach the caller through ``callbacks`` and the
    trials' attributes. Optuna's verbosity is put back afterwards.
    """
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def trial_limit(study: optuna.Study, cfg: SearchConfig, *, join: bool) -> int | None:
    """The count of trials at which this call's workers stop (None: no count).

    A call that starts trials (not ``join``) with ``n_trials`` stops at the study's total once
    they are added, and stores that total on the study, so that ``an-search worker`` joining
    without ``--n-trials`` stops there too. A joining call with ``n_trials`` stops once its
    own workers ran that many (``worker.SharedTrialBudget`` with a call id), whatever other
    processes add meanwhile.
    """
    if cfg.n_trials is None:
        return study.user_attrs.get("target_trials") if join else None
    if join:
        return cfg.n_trials
    limit = count_trials(study.get_trials(deepcopy=False), waiting=False) + cfg.n_trials
    study.set_user_attr("target_trials", limit)
    return limit


def _sampler_pruner(
    cfg: SearchConfig, objectives: tuple[str, ...]
) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner, str | None]:
    nop = optuna.pruners.NopPruner()
    if len(objectives) > 1:
        sampler = PerTrialSeedSampler(
            lambda seed: optuna.samplers.NSGAIISampler(
                population_size=cfg.population_size, seed=seed
            ),
            cfg.seed,
        )
        return sampler, nop, NO_PRUNING_MESSAGE if cfg.pruner != "none" else None
    sampler = PerTrialSeedSampler(_tpe, cfg.seed)
    if cfg.pruner == "none":
        return sampler, nop, None
    pruner = optuna.pruners.HyperbandPruner(
        min_resource=cfg.hyperband_min_resource,
        max_resource=cfg.train.epochs,
        reduction_factor=cfg.hyperband_reduction_factor,
    )
    return sampler, pruner, None


def _tpe(seed: int) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():  # group=True is marked experimental since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, group=True)


def _check_budgets(cfg: SearchConfig, cost: dict[str, float]) -> None:
    for name, limit in cfg.budgets().items():
        if name in cost and cost[name] > limit:  # (params and MACs: latency is not timed here)
            raise BudgetError(
                f"max_{name} is below the unconverted {cfg.model}'s {_fmt(cost[name])} (AN only "
                f"adds cost, so no configuration can meet it): max_{name}={_fmt(limit)}"
            )


def _fmt(value: Any) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
