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

import json
import sqlite3
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from an_search._rng import kept_rng
from an_search.errors import BudgetError, StorageError
from an_search.input_size import check_input_fits
from an_search.rewrite import find_sites
from an_search.train import DataSpec, check_batches, resolve_data
from an_search.train.config import MACHINE_SETTINGS

from ._files import make_dir
from ._lock import sqlite_file, sqlite_writer_lock
from ._seeding import PerTrialSeedSampler
from ._weights import check_same_weights, weights_summary
from .build import build_model
from .config import OBJECTIVES, SearchConfig, no_infinite_budget, parse_objectives
from .objective import TRIAL_ERRORS, Objective
from .report import check_report_dir
from .sampling import BASELINES, check_space, enqueue_baselines
from .space import SearchSpace, load_space
from .storage import (
    DEFAULT_DB_NAME,
    DEFAULT_JOURNAL_NAME,
    check_sqlite_writer,
    count_trials,
    fail_dead_worker_trials,
    hide_password,
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
    _check_same_search(study, cfg, objectives, space)
    weights = weights_summary(cfg.checkpoint)
    _check_same_data(study, data)  # (what the study's creator stored: workers joining it
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


def study_storage_url(storage: str | Path) -> str:
    """The storage that :func:`open_study` reads ``storage`` as: a URL or journal file path.

    Raises:
        StorageError: a run directory without a study file, or a storage file that is missing.
    """
    path = Path(storage)
    if "://" not in str(storage) and path.is_dir():
        files = [path / n for n in (DEFAULT_DB_NAME, DEFAULT_JOURNAL_NAME) if (path / n).is_file()]
        if not files:
            raise StorageError(f"run directory holds no {DEFAULT_DB_NAME}: {path}")
        storage = files[0]
    url = resolve_storage_url(storage, ".")
    file = Path(url) if "://" not in url else sqlite_file(url)  # (a URL's ?query, %20 read)
    if file is not None:
        if not file.is_file():
            raise StorageError(f"storage file must exist to read a study: {file}")
        if "://" in url and not _has_optuna_tables(file):
            raise _no_study(storage)  # (before Optuna makes it a database)
    return url


def _no_study(storage: str | Path) -> StorageError:
    return StorageError(
        f"storage {hide_password(str(storage))!r} holds no study: give the storage of one that "
        "`an-search run` made"
    )


def _has_optuna_tables(file: Path) -> bool:
    """Whether a SQLite file holds Optuna's tables, read without writing: True for a file that
    is no database (:func:`open_storage` says what it is), False for an empty one."""
    try:
        with closing(sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'studies'").fetchone()
    except sqlite3.Error:
        return True
    return found is not None


def open_study(storage: str | Path, study_name: str | None = None) -> optuna.Study:
    """Load an existing study for reports: a storage URL/file, or a run directory.

    Args:
        storage: URL, journal or SQLite file, or a run directory holding ``study.db``
            (or ``study.log``).
        study_name: needed only when the storage holds several studies.

    Raises:
        StorageError: nothing to open, no such study, or several studies and no name.
    """
    backend = open_storage(study_storage_url(storage))
    names = optuna.get_all_study_names(backend)
    if not names:
        raise _no_study(storage)
    if study_name is None:
        if len(names) != 1:
            raise StorageError(
                f"storage holds {len(names)} studies, so a study name is needed (--study-name): "
                f"{', '.join(map(repr, names))}"
            )
        study_name = names[0]
    if study_name not in names:
        raise StorageError(
            f"no study of that name in the storage ({', '.join(map(repr, names))}): {study_name!r}"
        )
    return optuna.load_study(study_name=study_name, storage=backend)


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


#: Settings a trial's result depends on beyond the model and objectives (``train.*``: the proxy
#: training's); a resumed study must keep them. Paths (data, checkpoint) and the device, threads
#: and loader workers may differ, e.g. on another machine. The budgets too: the stored trials
#: were judged by the study's, and another would rank (and export) trials over it.
_SAME_SETTINGS = ("cost_img_size", "latency_runs", "max_params", "max_macs", "max_latency_ms")


def _check_same_search(
    study: optuna.Study, cfg: SearchConfig, objectives: tuple[str, ...], space: SearchSpace
) -> None:
    """A resumed study must be the same search (else its trials do not compare)."""
    trials = study.get_trials(deepcopy=False)  # (first: a creator writes settings, then trials)
    attrs = study.user_attrs
    expected = [OBJECTIVES[o][1] for o in objectives]
    directions = [d.name.lower() for d in study.directions]
    if "model" not in attrs or "objectives" not in attrs:  # (no settings, or half of them: an
        # empty study made elsewhere, or one whose creator was killed, is taken if it fits)
        if trials:
            raise StorageError(
                f"study {study.study_name!r} holds {len(trials)} trials but no an-search settings "
                "(another tool made it): use another study name (--study-name)"
            )
        if directions != expected:
            goals = ", ".join(f"{d}s {o}" for d, o in zip(expected, objectives, strict=True))
            raise StorageError(
                f"study {study.study_name!r} was made to {'/'.join(directions)}, this search "
                f"{goals}: use another study name (--study-name)"
            )
        return
    if attrs["model"] != cfg.model or tuple(attrs["objectives"]) != objectives:
        raise StorageError(
            f"study {study.study_name!r} searches {attrs['model']} for "
            f"{','.join(attrs['objectives'])}; resume it with the same model and objectives or "
            f"use another study name: {cfg.model} for {','.join(objectives)}"
        )
    stored, given = attrs.get("config"), json.loads(json.dumps(cfg.to_dict()))
    if not isinstance(stored, dict):
        return
    # (a setting the study's version did not store yet is not compared)
    pairs = [(k, no_infinite_budget(k, stored[k]), given[k]) for k in _SAME_SETTINGS if k in stored]
    train = stored.get("train") or {}
    pairs += [
        (f"train.{k}", train[k], v)
        for k, v in given["train"].items()
        if k in train and k not in MACHINE_SETTINGS
    ]
    old_space = attrs.get("space") or {}
    pairs.append(("space", old_space.get("name"), space.name))
    pairs.append(("the space file's text", old_space.get("text"), space.text))
    for key, old, new in pairs:
        if old != new:
            shown = (old, new) if key != "the space file's text" else ("one text", "another")
            raise StorageError(
                f"study {study.study_name!r} was run with {key} {shown[0]!r}, this call has "
                f"{shown[1]!r}: resume it with the same settings, or start another study "
                "(--study-name or --output)"
            )


def data_summary(data: DataSpec, train_images: int, val_images: int) -> dict[str, Any]:
    """What a study's trials train on, path aside (the data may move to another machine)."""
    return {
        "classes": list(data.class_names) or data.num_classes,
        "train_images": train_images,
        "validation_images": val_images,
    }


def _check_same_data(study: optuna.Study, data: dict[str, Any] | None) -> None:
    """A resumed study must train on the same data: trials on other data do not compare."""
    stored = study.user_attrs.get("data")
    if data is None or not isinstance(stored, dict):
        return  # (a study from before the data was stored is not compared)
    if json.loads(json.dumps(data)) == stored:
        return
    raise StorageError(
        f"study {study.study_name!r} was run on {_describe_data(stored)}, this call's data has "
        f"{_describe_data(data, stored)}: give --data the same images (their path may differ), "
        "or run other data as another study (an-search run --study-name or --output)"
    )


def _describe_data(data: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    classes, theirs = data.get("classes"), (other or {}).get("classes")
    count = len(classes) if isinstance(classes, list) else classes
    renamed = isinstance(theirs, list) and len(theirs) == count and classes != theirs
    return (
        f"{count} classes{' (other names)' if renamed else ''}, {data.get('train_images')} "
        f"training and {data.get('validation_images')} validation images"
    )


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
