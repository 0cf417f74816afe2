"""Optuna search over where and how to place Attentive Normalization (DESIGN points 8-11).

    >>> from an_search.search import SearchConfig, run_search, write_report
    >>> study = run_search(SearchConfig("resnet18", n_trials=20))
    >>> write_report(study, "an-runs/resnet18-default")

Spaces (``space``, ``sampling``), settings (``config``), storages and dead-worker recovery
(``storage``), one trial (``objective``), the study (``study``), reports (``report``, ``plots``),
parallel workers (``workers``, ``worker``) and trials under torchrun (``ddp``).
"""

from __future__ import annotations

from ._weights import study_checkpoint
from .build import Built, build_model, cost_input_size, measure_latency_ms
from .config import OBJECTIVES, PRUNERS, SearchConfig, parse_objectives
from .ddp import DDPObjective
from .join import check_study_data, config_from_dict, join_config
from .objective import TRIAL_ERRORS, Objective
from .plots import plot_history, plot_pareto
from .report import (
    FRONT_COSTS,
    dashboard_command,
    export_top,
    front_cost,
    pareto_front,
    ranked_trials,
    study_table,
    write_csv,
    write_json,
    write_report,
)
from .sampling import BASELINES, check_space, config_key, sample_recipe
from .space import PER_STAGE, Param, SearchSpace, list_spaces, load_space, parse_space
from .storage import (
    DEFAULT_DB_NAME,
    DEFAULT_JOURNAL_NAME,
    fail_dead_worker_trials,
    heartbeat_enabled,
    open_storage,
    record_worker,
    resolve_storage_url,
)
from .study import (
    NO_PRUNING_MESSAGE,
    create_or_load_study,
    open_study,
    prepare_search,
    quiet_optuna,
    run_search,
    study_storage_url,
)
from .worker import SharedTrialBudget, count_trials, run_worker
from .workers import WorkerPlan, plan_workers, run_workers

__all__ = [
    "FRONT_COSTS",
    "BASELINES",
    "DEFAULT_DB_NAME",
    "DEFAULT_JOURNAL_NAME",
    "NO_PRUNING_MESSAGE",
    "OBJECTIVES",
    "PER_STAGE",
    "PRUNERS",
    "TRIAL_ERRORS",
    "Built",
    "DDPObjective",
    "Objective",
    "Param",
    "SearchConfig",
    "SearchSpace",
    "SharedTrialBudget",
    "WorkerPlan",
    "build_model",
    "check_space",
    "check_study_data",
    "config_from_dict",
    "config_key",
    "cost_input_size",
    "count_trials",
    "create_or_load_study",
    "dashboard_command",
    "export_top",
    "front_cost",
    "fail_dead_worker_trials",
    "heartbeat_enabled",
    "join_config",
    "list_spaces",
    "load_space",
    "measure_latency_ms",
    "open_storage",
    "open_study",
    "study_checkpoint",
    "study_storage_url",
    "pareto_front",
    "ranked_trials",
    "parse_objectives",
    "parse_space",
    "plan_workers",
    "plot_history",
    "plot_pareto",
    "prepare_search",
    "quiet_optuna",
    "record_worker",
    "resolve_storage_url",
    "run_search",
    "run_worker",
    "run_workers",
    "sample_recipe",
    "study_table",
    "write_csv",
    "write_json",
    "write_report",
]
