"""Optuna search over where and how to place Attentive Normalization (DESIGN points 8-11).

    >>> from an_search.search import SearchConfig, run_search, write_report
    >>> study = run_search(SearchConfig("resnet18", n_trials=20))
    >>> write_report(study, "an-runs/resnet18-default")

Spaces (``space``, ``sampling``), settings (``config``), storages and dead-worker recovery
(``storage``), one trial (``objective``), the study (``study``), reports (``report``, ``plots``).
"""

from __future__ import annotations

from .build import Built, build_model, cost_input_size, measure_latency_ms
from .config import OBJECTIVES, PRUNERS, SearchConfig, parse_objectives
from .objective import TRIAL_ERRORS, Objective
from .plots import plot_history, plot_pareto
from .report import (
    dashboard_command,
    export_top,
    pareto_front,
    study_table,
    write_csv,
    write_json,
    write_report,
)
from .sampling import BASELINES, check_space, config_key, sample_recipe
from .space import PER_STAGE, Param, SearchSpace, list_spaces, load_space, parse_space
from .storage import (
    DEFAULT_DB_NAME,
    fail_dead_worker_trials,
    open_storage,
    record_worker,
    resolve_storage_url,
)
from .study import NO_PRUNING_MESSAGE, create_or_load_study, open_study, quiet_optuna, run_search

__all__ = [
    "BASELINES",
    "DEFAULT_DB_NAME",
    "NO_PRUNING_MESSAGE",
    "OBJECTIVES",
    "PER_STAGE",
    "PRUNERS",
    "TRIAL_ERRORS",
    "Built",
    "Objective",
    "Param",
    "SearchConfig",
    "SearchSpace",
    "build_model",
    "check_space",
    "config_key",
    "cost_input_size",
    "create_or_load_study",
    "dashboard_command",
    "export_top",
    "fail_dead_worker_trials",
    "list_spaces",
    "load_space",
    "measure_latency_ms",
    "open_storage",
    "open_study",
    "pareto_front",
    "parse_objectives",
    "parse_space",
    "plot_history",
    "plot_pareto",
    "quiet_optuna",
    "record_worker",
    "resolve_storage_url",
    "run_search",
    "sample_recipe",
    "study_table",
    "write_csv",
    "write_json",
    "write_report",
]
