"""Settings of one search: :class:`SearchConfig`, and the objectives a study can optimise."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from an_search._values import SEED_MAX, is_integer, is_number
from an_search.errors import BudgetError, TrainConfigError, UnknownNameError
from an_search.train import TrainConfig

__all__ = [
    "OBJECTIVES",
    "PRUNERS",
    "SearchConfig",
    "default_run_dir",
    "no_infinite_budget",
    "parse_objectives",
]

#: Objective name -> (metric name shown by Optuna/optuna-dashboard, direction).
OBJECTIVES: dict[str, tuple[str, str]] = {
    "top1": ("top1", "maximize"),
    "macs": ("gmacs", "minimize"),
    "params": ("mparams", "minimize"),
    "latency": ("latency_ms", "minimize"),
}
#: "auto": Hyperband for one objective, none for several (Optuna cannot prune those).
PRUNERS = ("auto", "hyperband", "none")


@dataclass
class SearchConfig:
    """Everything one ``run_search`` call needs.

    Attributes:
        model: timm model name.
        data: dataset path or None for the embedded Animal-MNIST (``an_search.train.resolve_data``);
            with ``dataset``, that dataset's root.
        space: shipped space name or YAML path (``an_search.search.load_space``).
        output_dir: run directory (default SQLite file, reports); None: ``an-runs/<study_name>``.
        storage: Optuna URL, journal file (.log/.journal) or SQLite file; None:
            ``$OPTUNA_STORAGE``, else ``<output_dir>/study.db``.
        study_name: None: ``<model>-<space name>``, with ``-<objectives>`` for several.
        n_trials: trials this call runs (Optuna's meaning: a resumed study gets this many more;
            enqueued baselines count); None with ``timeout``: until the timeout.
        timeout: seconds after which no new trial starts.
        objectives: ``top1`` alone (Hyperband pruning), or ``top1`` plus any of ``macs``,
            ``params``, ``latency`` (NSGA-II, no pruning). A "top1,macs" string is accepted.
        max_params: budget in parameters, checked on the converted model before training.
        max_macs: budget in MACs (multiply-adds) at ``cost_img_size``, checked the same way.
        max_latency_ms: budget for the median batch-1 forward pass at ``cost_img_size``.
        seed: sampler seed; every trial's model init and training also use ``train.seed``.
        train: proxy-training settings (epochs, batches per epoch, image size...).
        checkpoint: local weights file every trial starts from (None: random init).
        cost_img_size: input side for MACs and latency; None: ``train.img_size``.
        pruner: ``auto``, ``hyperband`` or ``none``.
        hyperband_min_resource: epochs before the first pruning decision.
        hyperband_reduction_factor: Hyperband's eta (keep 1/eta of the trials at each rung).
        population_size: NSGA-II generation size (several objectives).
        latency_runs: timed forward passes per trial (after 2 warm-up passes).
        dataset: a timm dataset name with its prefix (``torch/cifar10``), read from ``data``
            (never downloaded); "" for image folders and tars.
    """

    model: str
    data: str | os.PathLike[str] | None = None
    space: str | os.PathLike[str] = "default"
    output_dir: str | os.PathLike[str] | None = None
    storage: str | os.PathLike[str] | None = None
    study_name: str | None = None
    n_trials: int | None = 20
    timeout: float | None = None
    objectives: Sequence[str] | str = ("top1",)
    max_params: float | None = None
    max_macs: float | None = None
    max_latency_ms: float | None = None
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | os.PathLike[str] | None = None
    cost_img_size: int | None = None
    pruner: str = "auto"
    hyperband_min_resource: int = 1
    hyperband_reduction_factor: int = 3
    population_size: int = 20
    latency_runs: int = 5
    dataset: str = ""

    def resolved_study_name(self, space_name: str) -> str:
        """The study name: the given one, else ``<model>-<space name>``, with ``-<objectives>``
        unless top-1 alone (``resnet18-default-top1-macs``), so that a search for other
        objectives starts its own study; file-name safe."""
        if self.study_name:
            return self.study_name
        names = _objective_names(self.objectives)
        tail = "" if names == ["top1"] else "-" + "-".join(names)
        return re.sub(r"[^\w.-]+", "_", f"{self.model}-{space_name}{tail}")

    def run_dir(self, space_name: str) -> Path:
        """The run directory: ``output_dir``, else ``an-runs/<study name>``."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return default_run_dir(self.resolved_study_name(space_name))

    def budgets(self) -> dict[str, float]:
        """Budget name (``params``, ``macs``, ``latency_ms``) -> limit, for the ones set.

        Raises:
            BudgetError: a budget that is not a positive number.
        """
        limits = {
            "params": self.max_params,
            "macs": self.max_macs,
            "latency_ms": self.max_latency_ms,
        }
        out = {}
        for name, limit in limits.items():
            if limit is None:
                continue
            if not is_number(limit) or not 0 < limit < math.inf:  # (NaN fails too)
                raise BudgetError(f"max_{name} must be a positive number: {limit!r}")
            out[name] = float(limit)
        return out

    def validate(self) -> None:
        """Check every setting's type and range, the training settings' too, before anything
        is built or stored (a bad one would fail deep inside the first trial, after the study
        stored it, and the corrected call would then be refused as another search).

        Raises:
            TrainConfigError: the first setting of a wrong type or out of range.
            UnknownNameError: an unknown objective or pruner.
        """
        if not isinstance(self.train, TrainConfig):
            raise TrainConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        self.train.validate()
        for name in ("model", "study_name", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "study_name" and value is None):
                raise TrainConfigError(f"{name} must be a string, got {value!r}")
        if not self.model:
            raise TrainConfigError("model must be a timm model name, got ''")
        if not isinstance(self.objectives, str) and not (
            isinstance(self.objectives, Sequence)
            and all(isinstance(o, str) for o in self.objectives)
        ):
            raise TrainConfigError(f"objectives must be names, got {self.objectives!r}")
        parse_objectives(self.objectives)
        if self.pruner not in PRUNERS:
            raise UnknownNameError(f"unknown pruner (known: {', '.join(PRUNERS)}): {self.pruner!r}")
        if self.timeout is not None and (not is_number(self.timeout) or not self.timeout > 0):
            raise TrainConfigError(f"timeout must be None or positive, got {self.timeout!r}")
        for name, low, optional in _INT_SETTINGS:
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not is_integer(value) or value < low:
                rule = {0: "0 or more", 1: "positive"}.get(low, f"{low} or more")
                kind = "" if is_integer(value) else "an integer, "
                raise TrainConfigError(
                    f"{name} must be {'None or ' if optional else ''}{kind}{rule}, got {value!r}"
                )
        if self.seed > SEED_MAX:
            raise TrainConfigError(f"seed must be at most {SEED_MAX} (2**32 - 1), got {self.seed}")
        if self.train.checkpoint_dir is not None or self.train.resume:
            raise TrainConfigError(
                "train.checkpoint_dir and train.resume are retrain's: a search's trials keep no "
                "checkpoints (they would all share one file), so leave them unset"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (paths as strings), stored on the study; the data and checkpoint
        paths made absolute, so that ``retrain`` and workers find them from any folder."""
        data = asdict(self)
        for key in ("data", "checkpoint"):
            data[key] = _absolute(data[key])
        return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in data.items()}


def default_run_dir(study_name: str) -> Path:
    """``an-runs/<study name>``, the run directory of a study given no other; the name made one
    folder's name (``team/r50`` -> ``team_r50``, ``..`` -> ``__``), never a path elsewhere. A
    study that an earlier version put in ``an-runs/team/r50`` (inside an-runs/) stays there."""
    runs = Path("an-runs")
    folder = re.sub(r"[/\\\0]", "_", study_name)  # (any other character is a folder's)
    folder = folder if folder.strip(".") else folder.replace(".", "_") or "_"
    legacy = runs / study_name
    if folder != study_name and legacy.is_dir():
        inside = legacy.resolve().is_relative_to(runs.resolve())
        if inside and legacy.resolve() != runs.resolve():
            return legacy
    return runs / folder


#: (name, lowest value, None allowed) of the integer settings.
_INT_SETTINGS = (
    ("n_trials", 1, True),
    ("seed", 0, False),
    ("cost_img_size", 1, True),
    ("hyperband_min_resource", 1, False),
    ("hyperband_reduction_factor", 2, False),
    ("population_size", 2, False),
    ("latency_runs", 1, False),
)


def no_infinite_budget(key: str, value: Any) -> Any:
    """A stored budget (``max_*``) of ``inf`` as None. Versions before budgets were checked took
    ``--max-params inf`` as no limit and stored it; a resume or a joining worker reads it so."""
    return None if key.startswith("max_") and value == math.inf else value


def _absolute(value: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """An existing path as an absolute one; anything else (None, a missing path) as it is."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def parse_objectives(objectives: Sequence[str] | str) -> tuple[str, ...]:
    """Validate objective names: ``top1`` first, then distinct cost objectives.

    Raises:
        UnknownNameError: an unknown or repeated name, or a list not starting with top1.
    """
    names = _objective_names(objectives)
    for name in names:
        if name not in OBJECTIVES:
            raise UnknownNameError(f"unknown objective (known: {', '.join(OBJECTIVES)}): {name!r}")
    if not names or names[0] != "top1" or "top1" in names[1:]:
        raise UnknownNameError(f"objectives must start with top1, once: {','.join(names)!r}")
    if len(set(names)) != len(names):
        raise UnknownNameError(f"objectives must not repeat a name: {','.join(names)!r}")
    return tuple(names)


def _objective_names(objectives: Sequence[str] | str) -> list[str]:
    """``"top1, macs"`` or a sequence -> the names, stripped, empty ones left out."""
    names = objectives.split(",") if isinstance(objectives, str) else list(objectives)
    return [n.strip() for n in names if n.strip()]
