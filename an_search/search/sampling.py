"""From a search space and a model's sites to the arguments of one ``convert()`` call.

A configuration is a JSON-able dict of :func:`an_search.convert` keyword arguments (``placement``,
``k``, ``head``, ``pool``, ``init``, ``include``, ``norm_types``). Optuna parameter names:
``placement``, ``base``, ``stage{i}_role``, ``stage{i}_k`` (or ``k`` when shared), ``head``,
``pool``, ``init``. Parameters are conditional: K is sampled only for stages that get AN, and
head/pool/init only when some site does, so TPE never learns from values that changed nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.trial import TrialState

from an_search.errors import NoSitesSelectedError, SpaceError
from an_search.rewrite import SiteReport, default_k, select_sites

from ._names import PER_STAGE
from .space import Param, SearchSpace

__all__ = ["BASELINES", "check_space", "config_key", "enqueue_baselines", "sample_recipe"]

#: The two enqueued reference configurations: the unconverted model and the paper's placement.
BASELINES: dict[str, dict[str, Any]] = {
    "bn": {"placement": "none"},
    "paper": {"placement": "paper"},
}


def enqueue_baselines(study: optuna.Study) -> None:
    """Queue each baseline the study does not hold (or holds only as FAIL: a re-queued run
    records ``requeued_from``, the last failed one's number)."""
    trials = study.get_trials(deepcopy=False)
    have = {t.user_attrs.get("baseline") for t in trials if t.state != TrialState.FAIL}
    failed = {  # (the last failed run of each: the report names its re-queued run)
        t.user_attrs.get("baseline"): t.number for t in trials if t.state == TrialState.FAIL
    }
    for name in BASELINES:
        if name not in have:
            attrs: dict[str, Any] = {"baseline": name}
            if name in failed:
                attrs["requeued_from"] = failed[name]
            study.enqueue_trial({}, user_attrs=attrs)


def sample_recipe(trial: Any, space: SearchSpace, report: SiteReport) -> dict[str, Any]:
    """Sample one configuration from ``space`` for the model described by ``report``.

    Args:
        trial: an ``optuna.trial.Trial`` (or ``FixedTrial``) to ask for values.
        space: a validated space.
        report: the model's sites (:func:`an_search.rewrite.find_sites`).

    Returns:
        ``convert()`` keyword arguments; ``{"placement": "none"}`` when nothing gets AN.
    """
    _check_enqueued_names(trial, space, report)
    base = _base(trial, space, report)
    norm_types = None if base == "any" else [base]
    placement = space.placement.suggest(trial, "placement")
    config: dict[str, Any] = {"placement": placement}
    if placement == PER_STAGE:
        names, used = _per_stage(trial, space, report, base)
        config = {"placement": "none", "include": names}
    else:
        used = _preset_stages(report, placement, norm_types)
        if norm_types is not None:
            config["norm_types"] = norm_types
    if not used:
        return dict(BASELINES["bn"])
    config["k"] = _k(trial, space, report, used)
    config["head"] = space.head.suggest(trial, "head")
    config["pool"] = space.pool.suggest(trial, "pool")
    init = space.init.suggest(trial, "init")
    if init is not None:
        config["init"] = init
    return config


def _check_enqueued_names(trial: Any, space: SearchSpace, report: SiteReport) -> None:
    """Refuse a trial enqueued with a parameter name this space never asks for (a typo, or
    another space's: ``k`` where K is per stage), which Optuna would ignore silently."""
    storage = getattr(getattr(trial, "study", None), "_storage", None)
    if storage is None:  # (a FixedTrial: its own check)
        return
    fixed = storage.get_trial_system_attrs(trial._trial_id).get("fixed_params") or {}
    stages = range(report.num_stages)
    names = {"base", "placement", "head", "pool", "init"}
    if _shared_k(space, report.num_stages):
        names.add("k")
    elif space.k is not None:
        names |= {f"stage{i}_k" for i in stages}
    names |= {f"stage{i}_role" for i in stages} if space.stage_role is not None else set()
    unknown = sorted(set(fixed) - names)
    if unknown:
        raise ValueError(
            f"{unknown[0]!r} is not a parameter of space {space.name!r} (its parameters: "
            f"{', '.join(sorted(names))})"
        )
    constants = {
        "base": space.base,
        "placement": space.placement,
        "head": space.head,
        "pool": space.pool,
        "init": space.init,
        "k": space.k,
    }
    for name, param in constants.items():  # (a constant is never asked of the trial: Optuna
        # would not see the enqueued value, and the trial would run the space's silently)
        if isinstance(param, Param) and param.dist is None and name in fixed:
            if fixed[name] != param.value:
                raise ValueError(
                    f"{name}={fixed[name]!r} is outside the space: it fixes {name} to "
                    f"{param.value!r}"
                )


def check_space(space: SearchSpace, report: SiteReport) -> None:
    """Check that ``space`` fits this model: K per stage, base kinds, at least one AN site.

    Raises:
        SpaceError: the first mismatch, then the bad value.
    """
    n = report.num_stages
    if isinstance(space.k, tuple) and len(space.k) != n:
        raise SpaceError(
            f"k.per_stage must give one parameter per stage of the model ({n}): {len(space.k)}"
        )
    kinds = _kinds(report)
    bases = [b for b in space.base.values() if b == "any" or b in kinds]
    if not bases:
        raise SpaceError(
            f"base must include 'any' or a norm kind of this model ({', '.join(kinds)}): "
            f"{list(space.base.values())}"
        )
    for placement in space.placement.values():
        for base in bases:
            norm_types = None if base == "any" else [base]
            if placement == PER_STAGE:
                roles = [r for r in space.stage_role.values() if r != "none"]  # type: ignore[union-attr]
                staged = [s for s in report.supported if s.stage is not None]
                if any(_in_role(s, r, base) for s in staged for r in roles):
                    return
            elif _preset_stages(report, placement, norm_types):
                return
    raise SpaceError(
        f"a search space must convert at least one site of this model ({report.model_name}): "
        f"placement {list(space.placement.values())} selects none"
    )


def config_key(recipe: dict[str, Any]) -> str:
    """A short hash naming the model a recipe builds: its sites (name, K, head, pool) and init.

    Two trials with the same key train the same model, whatever their Optuna parameters.
    """
    sites = sorted((s["name"], s["k"], s["head"], s["pool"]) for s in recipe["sites"])
    what = {"sites": sites, "init": recipe["init"] if sites else None}
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]


def _kinds(report: SiteReport) -> list[str]:
    return sorted({s.base for s in report.supported})


def _base(trial: Any, space: SearchSpace, report: SiteReport) -> str:
    """Which base norm to convert: asked only when the model has sites of several kinds."""
    kinds = _kinds(report)
    if len(kinds) <= 1:
        return "any"
    if space.base.dist is None:
        return space.base.value
    choices = [b for b in space.base.values() if b == "any" or b in kinds]
    return trial.suggest_categorical("base", choices)


def _in_role(site: Any, role: str, base: str) -> bool:
    if base != "any" and site.base != base:
        return False
    return role == "all" or role in site.roles


def _per_stage(
    trial: Any, space: SearchSpace, report: SiteReport, base: str
) -> tuple[list[str], list[int]]:
    """Ask a role for each stage; return the chosen site names and the stages they fill."""
    assert space.stage_role is not None  # parse_space guarantees it for per-stage
    names, used = [], []
    for i in range(report.num_stages):
        role = space.stage_role.suggest(trial, f"stage{i}_role")
        chosen = [s.name for s in report.supported if s.stage == i and _in_role(s, role, base)]
        if chosen and role != "none":
            names += chosen
            used.append(i)
    return names, used


def _preset_stages(report: SiteReport, placement: str, norm_types: list[str] | None) -> list[int]:
    """Stages whose K the preset uses: label each stage's K with its index and read them back."""
    if placement == "none":
        return []
    n = report.num_stages
    try:
        chosen = select_sites(
            report, placement, norm_types=norm_types, k=list(range(1, n + 1)) if n else 1
        )
    except NoSitesSelectedError:
        return []
    return sorted({k - 1 for k in chosen.values()})


def _shared_k(space: SearchSpace, n_stages: int) -> bool:
    """Whether the space asks one ``k`` for every stage (else ``stage{i}_k``)."""
    return isinstance(space.k, Param) and (space.k_shared or n_stages == 0)


def _k(
    trial: Any, space: SearchSpace, report: SiteReport, used: list[int]
) -> int | list[int] | None:
    """K for ``convert``: None (paper's rule), one int, or one int per stage."""
    if space.k is None:
        return None
    n = report.num_stages
    if _shared_k(space, n):
        return space.k.suggest(trial, "k")  # type: ignore[union-attr]
    per_stage = space.k if isinstance(space.k, tuple) else (space.k,) * n
    k = default_k(report)
    for i in used:
        k[i] = per_stage[i].suggest(trial, f"stage{i}_k")
    return k
