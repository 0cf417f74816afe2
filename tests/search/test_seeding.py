"""The search's sampler is seeded per trial: a study split over calls (a resume, a second
`an-search run`) proposes what one call would, and nearby seeds draw unrelated streams."""

from __future__ import annotations

from dataclasses import replace

import optuna
import pytest

from an_search.search import SearchConfig
from an_search.search._seeding import trial_seed
from an_search.search.study import _sampler_pruner


def _toy(trial: optuna.Trial) -> float:  # conditional, as the search space's K per placement
    placement = trial.suggest_categorical("placement", ["paper", "all", "last-in-block"])
    k = trial.suggest_int(f"k_{placement}", 1, 32)
    x = trial.suggest_float("x", 0.0, 1.0)
    return k / 32 * x if placement != "all" else x


def _toy2(trial: optuna.Trial) -> tuple[float, float]:
    return _toy(trial), trial.params["x"] ** 2


def _proposals(cfg: SearchConfig, splits: list[int], objectives: tuple[str, ...]) -> list:
    """Run the study in calls of ``splits`` trials, each with the sampler a new process makes."""
    study = optuna.create_study(directions=["maximize"] + ["minimize"] * (len(objectives) - 1))
    for n in splits:
        study.sampler, study.pruner, _ = _sampler_pruner(cfg, objectives)
        study.optimize(_toy if len(objectives) == 1 else _toy2, n_trials=n)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("objectives", [("top1",), ("top1", "macs")])
def test_a_split_study_proposes_what_one_call_would(objectives: tuple[str, ...]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = SearchConfig("resnet10t", seed=7, population_size=4)
    whole = _proposals(cfg, [24], objectives)  # past TPE's 10 random start-up trials
    assert _proposals(cfg, [5, 9, 10], objectives) == whole
    assert _proposals(replace(cfg, seed=8), [24], objectives) != whole


def test_a_resumed_seed_does_not_replay_another_seed() -> None:
    """(Before: a seed-0 study resumed after 3 trials was reseeded 0 + 3, and proposed what a
    fresh seed-3 study does.)"""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    resumed = _proposals(SearchConfig("resnet10t", seed=0), [3, 3], ("top1",))
    fresh = _proposals(SearchConfig("resnet10t", seed=3), [3], ("top1",))
    assert resumed[3:] != fresh
    assert len({trial_seed(s, n) for s in range(20) for n in range(20)}) == 400
