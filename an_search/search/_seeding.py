"""A sampler seeded afresh for every trial, from the study's seed and the trial's number.

Optuna samplers draw from one random stream per sampler object, so a study resumed by a new
process (or split over calls) proposes other configurations than one uninterrupted call with the
same seed, and a resumed seed-``s`` study reseeded ``s + n`` replays seed ``s + n``'s proposals.
Here trial ``n``'s proposal depends only on the seed, ``n`` and the study's trials so far: the
same history gives the same configuration however the calls were cut, and different seeds draw
unrelated streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

__all__ = ["PerTrialSeedSampler", "trial_seed"]


def trial_seed(seed: int, number: int) -> int:
    """Trial ``number``'s sampler seed: a hash of both (not ``seed + number``: streams of
    nearby seeds would overlap)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeedSampler(BaseSampler):
    """``make(trial_seed(seed, trial.number))`` samples each trial.

    Args:
        make: builds the sampler (TPE, NSGA-II...) from a seed.
        seed: the study's seed (0 or more).
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    @property
    def inner(self) -> BaseSampler:
        """The sampler of the current (or last) trial."""
        return self._inner

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
