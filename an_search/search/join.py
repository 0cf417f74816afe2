"""Settings travel with the study: rebuild them in a worker process, or to join from elsewhere.

``an-search run`` stores its :class:`SearchConfig` on the study (``config``) and the space's text
(``space``). :func:`config_from_dict` turns the first back into a config (how
``run_workers`` hands settings to its worker processes); :func:`join_config` reads both from a
study that another machine created, for ``an-search worker``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from an_search.errors import CheckpointError, DataError, StorageError
from an_search.train import TrainConfig

from ._files import make_dir
from .config import SearchConfig, default_run_dir, no_infinite_budget
from .space import shipped_name
from .study import open_study, study_storage_url

__all__ = ["check_study_data", "config_from_dict", "join_config"]


def check_study_data(path: str | os.PathLike[str] | None) -> None:
    """Raise DataError when a study's stored data path (None: the embedded data) is not here.

    Raises:
        DataError: naming the path and ``--data``, the way to give its path on this machine.
    """
    if path is not None and not Path(path).exists():
        raise DataError(
            f"the study's data {str(path)!r} is not on this machine: give its path here with --data"
        )


def join_config(
    storage: str,
    study_name: str | None = None,
    *,
    data: str | None = None,
    device: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> SearchConfig:
    """The settings of a study that ``an-search run`` created elsewhere, to join it from here.

    They are read from the study (its ``config`` and ``space`` attributes); a space file that
    does not exist on this machine is rewritten from the study's copy into the run directory.

    Args:
        storage: the study's storage (a server URL when the study lives on another machine).
        study_name: needed when the storage holds several studies.
        data: the dataset's path on this machine (default: the creator's).
        device: training device here (default: the creator's).
        output_dir: local run directory (default: ``an-runs/<study name>``).
        n_trials: trials to add (default None: up to the total the creator set).
        timeout: seconds after which this machine's workers start no new trial.
        checkpoint: the study's starting weights' path on this machine (default: the
            creator's); the study checks that they are the same file's content.

    Raises:
        StorageError: no such study, or one that ``an-search run`` did not create.
        DataError: no ``data`` given, and the study's data path does not exist here.
        CheckpointError: no ``checkpoint`` given, and the study's weights are not here.
    """
    study = open_study(storage, study_name)
    attrs = study.user_attrs
    if "config" not in attrs:
        raise StorageError(
            f"study {study.study_name!r} holds no an-search settings: join a study that "
            "`an-search run` created"
        )
    cfg = config_from_dict(attrs["config"])
    run_dir = Path(output_dir) if output_dir is not None else default_run_dir(study.study_name)
    space = attrs.get("space", {})
    path = Path(str(cfg.space))
    own = not shipped_name(str(cfg.space))  # (a file of any name)
    if own and not path.is_file() and space.get("text"):
        path = make_dir(run_dir) / f"{space.get('name', path.stem)}.yaml"
        path.write_text(space["text"])
    train = replace(cfg.train, device=device or cfg.train.device)
    if data is None:
        check_study_data(cfg.data)
    if checkpoint is None and cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise CheckpointError(
            f"the study's weights {str(cfg.checkpoint)!r} are not on this machine: give their "
            "path here with --checkpoint"
        )
    return replace(
        cfg,
        storage=study_storage_url(storage),  # (a run directory: the study file in it)
        study_name=study.study_name,
        output_dir=str(run_dir),
        space=str(path) if own else cfg.space,
        data=data if data is not None else cfg.data,
        checkpoint=checkpoint if checkpoint is not None else cfg.checkpoint,
        n_trials=n_trials,
        timeout=timeout,
        train=train,
    )


def config_from_dict(data: dict[str, Any]) -> SearchConfig:
    """Rebuild a :class:`SearchConfig` from ``SearchConfig.to_dict()`` (JSON round trip)."""
    train = dict(data.get("train") or {})
    if "scale" in train:
        train["scale"] = tuple(train["scale"])
    known = SearchConfig.__dataclass_fields__
    fields = {k: no_infinite_budget(k, v) for k, v in data.items() if k in known and k != "train"}
    if isinstance(fields.get("objectives"), list):
        fields["objectives"] = tuple(fields["objectives"])
    return SearchConfig(**fields, train=TrainConfig(**train))
