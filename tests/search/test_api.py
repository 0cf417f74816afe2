"""The search's Python API in one long-lived process (a notebook): bad settings are refused
before anything is stored, the caller's random states are kept, a run directory holds one study,
and a trial that fails on an unexpected error says why."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from an_search.errors import BudgetError, StorageError, TrainConfigError, UnknownNameError
from an_search.search import SearchConfig, export_top, run_search
from an_search.train import TrainConfig, resolve_data
from an_search.train.retrain import retrain


@pytest.fixture
def tiny(tmp_path: Path, tiny_train) -> SearchConfig:
    return SearchConfig(
        "resnet10t",
        output_dir=tmp_path / "run",
        n_trials=1,
        train=tiny_train(epochs=1, batches_per_epoch=2),
    )


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"n_trials": 2.5}, TrainConfigError, "n_trials must be None or an integer, positive"),
        ({"seed": "0"}, TrainConfigError, "seed must be an integer, 0 or more, got '0'"),
        ({"seed": 1.5}, TrainConfigError, "seed must be an integer, 0 or more"),
        ({"seed": 2**32}, TrainConfigError, "seed must be at most 4294967295 (2**32 - 1)"),
        (  # (before: an internal error from the loaders' torch seed, after the study was made)
            {"train": TrainConfig(seed=10**20)},
            TrainConfigError,
            "seed must be at most 4294967295 (2**32 - 1), got 100000000000000000000",
        ),
        (
            {"hyperband_min_resource": 0},
            TrainConfigError,
            "hyperband_min_resource must be positive",
        ),
        ({"hyperband_reduction_factor": 1}, TrainConfigError, "must be 2 or more, got 1"),
        ({"population_size": 1, "objectives": "top1,macs"}, TrainConfigError, "population_size"),
        ({"latency_runs": 0}, TrainConfigError, "latency_runs must be positive, got 0"),
        ({"cost_img_size": -3}, TrainConfigError, "cost_img_size must be None or positive"),
        ({"model": None}, TrainConfigError, "model must be a string, got None"),
        ({"study_name": 5}, TrainConfigError, "study_name must be a string, got 5"),
        ({"objectives": None}, TrainConfigError, "objectives must be names, got None"),
        ({"objectives": [1]}, TrainConfigError, "objectives must be names, got [1]"),
        ({"train": None}, TrainConfigError, "train must be a TrainConfig, got NoneType"),
        ({"timeout": "10"}, TrainConfigError, "timeout must be None or positive, got '10'"),
        ({"timeout": float("nan")}, TrainConfigError, "timeout must be None or positive, got nan"),
        ({"train": TrainConfig(lr=float("inf"))}, TrainConfigError, "lr must be finite, got inf"),
        (
            {"train": TrainConfig(weight_decay=float("inf"))},
            TrainConfigError,
            "weight_decay must be finite, got inf",
        ),
        ({"pruner": "median"}, UnknownNameError, "unknown pruner"),
        ({"max_params": float("nan")}, BudgetError, "max_params must be a positive number: nan"),
        ({"max_macs": float("inf")}, BudgetError, "max_macs must be a positive number: inf"),
        ({"max_latency_ms": 0}, BudgetError, "max_latency_ms must be a positive number: 0"),
        ({"train": TrainConfig(opt="adamw_typo")}, TrainConfigError, "opt 'adamw_typo'"),
        ({"train": TrainConfig(checkpoint_dir="ck")}, TrainConfigError, "are retrain's"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_stored(
    change: dict, error: type, message: str, tiny: SearchConfig
) -> None:
    """Before: TypeError, AttributeError, ZeroDivisionError... from deep inside, some after the
    study had stored the setting (the corrected call was then refused as another search)."""
    with pytest.raises(error) as info:
        run_search(replace(tiny, **change))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not Path(tiny.output_dir).exists()


def test_a_training_size_the_model_cannot_run_is_refused_before_the_study(
    tiny: SearchConfig,
) -> None:
    """Costs are measured at ``cost_img_size``, which fits; training at 16 px does not. (Before:
    the study was created and every trial failed on torch's RuntimeError.)"""
    from an_search.errors import ModelConfigError

    cfg = replace(
        tiny, model="convnext_atto", cost_img_size=64, train=replace(tiny.train, img_size=16)
    )
    with pytest.raises(ModelConfigError, match=r"^a 16x16 input is too small for this model, "):
        run_search(cfg)
    assert not Path(tiny.output_dir).exists()


def test_a_latency_budget_is_left_to_the_trials(tiny: SearchConfig) -> None:
    """A latency below one timing of the unconverted model is not refused up front: one timing
    is noise (a loaded machine times it 10x slower), and a folded AN model can time as fast as
    BatchNorm. The trials time their own models and mark those over it infeasible. (Before:
    BudgetError "max_latency_ms is below the unconverted resnet10t's 68 (AN only adds cost,
    ...)", from a timing the baseline trial then repeated.)"""
    study = run_search(replace(tiny, max_latency_ms=1e-6, latency_runs=1))
    (trial,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert trial.user_attrs["baseline"] == "bn"
    assert trial.user_attrs["latency_ms"] > 1e-6
    assert trial.user_attrs["infeasible"] == ["latency_ms"] and trial.user_attrs["steps"] == 0


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _seed(n: int) -> None:
    random.seed(n), np.random.seed(n), torch.manual_seed(n)


def test_the_callers_random_states_are_kept(tiny: SearchConfig, tmp_path: Path) -> None:
    """A search and a retrain seed every generator (so that trials repeat); the caller's own
    sequences go on as if they had not run (before: reset to the library's seed)."""
    _seed(7)
    expected = _draws()
    _seed(7)
    study = run_search(tiny)
    assert _draws() == expected
    _seed(7)
    assert study.trials[0].state == TrialState.COMPLETE
    from an_search.rewrite import Recipe

    plain = Recipe.from_selection(model="resnet10t", selected={"layer1.0.bn1": 4})
    retrain(plain, resolve_data(None), tiny.train, tmp_path / "rt")
    assert _draws() == expected


def test_a_run_directory_holds_one_study(tiny: SearchConfig) -> None:
    """The CLI's report.json guarded this; the API writes none (before: a second study went
    into the same study.db, and open_study of the directory failed)."""
    run_search(tiny)
    with pytest.raises(StorageError, match="holds study 'resnet10t-default'; a run directory"):
        run_search(replace(tiny, objectives="top1,macs"))
    assert optuna.get_all_study_names(f"sqlite:///{tiny.output_dir}/study.db") == [
        "resnet10t-default"
    ]


def test_a_trial_that_fails_on_an_unexpected_error_says_why(tiny: SearchConfig) -> None:
    def broken(done: int, total: int) -> None:
        raise RuntimeError("the progress display broke")

    from an_search.search import study as study_module

    with pytest.raises(RuntimeError):
        study_module.run_search(tiny, progress=broken)
    trial = optuna.load_study(
        study_name="resnet10t-default", storage=f"sqlite:///{tiny.output_dir}/study.db"
    ).trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "RuntimeError: the progress display broke"


def test_export_top_refuses_a_negative_count(tiny: SearchConfig, tmp_path: Path) -> None:
    study = run_search(tiny)
    with pytest.raises(TrainConfigError, match="top must be an integer, 0 or more, got -1"):
        export_top(study, -1, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_retrain_refuses_bad_settings_before_making_folders(tmp_path: Path) -> None:
    from an_search.rewrite import Recipe

    plain = Recipe.from_selection(model="resnet10t", selected={"layer1.0.bn1": 4})
    with pytest.raises(TrainConfigError, match="epochs must be at least 1"):
        retrain(plain, resolve_data(None), TrainConfig(epochs=0), tmp_path / "rt")
    assert not (tmp_path / "rt").exists()
