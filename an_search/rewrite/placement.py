"""Placement presets and site selection: which norms become AN, with which K.

Precedence of :func:`select_sites`, lowest to highest (like torch.ao's ``QConfigMapping``: global
< type < regex < name, the more specific word wins):

1. the preset picks a base set (supported sites only);
2. ``roles``, ``stages`` and ``norm_types`` filters each intersect it (a site passes ``roles`` with
   ANY listed role; ``norm_types`` matches the class name or the base kind);
3. ``include`` patterns add the supported sites they match;
4. ``exclude`` patterns remove the sites they match (the last word).

Patterns match whole qualified names: shell globs (``layer*.bn2``), or regexes when prefixed
``re:`` (``re:layer[12]\\..*``). Unsupported norm classes are never selected; they are listed in
``SiteReport.unsupported``.

K per site: an int for all, a list with one K per stage, or None for the paper's rule (first
``ceil(n/2)`` stages small K, the rest large: 10/20, or 5/10 for MobileNet/EfficientNet-class
models). Sites outside any stage take stage 0's K before it and the last stage's K after.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from an_search._values import is_integer
from an_search.errors import MAX_K, InvalidKError, NoSitesSelectedError, UnknownNameError

from ._roles import ROLES
from .sites import Site, SiteReport

__all__ = ["PLACEMENTS", "Placement", "default_k", "match_pattern", "select_sites"]

_MOBILE = re.compile(r"mobile|efficient|mnas|ghost|lcnet|tinynet|mixnet|fbnet|spnas|hardcore", re.I)


def _paper(report: SiteReport) -> list[Site]:
    """Per block: first site after a spatial conv, else first feeding one, else the first.

    A model with no block found (VGG, DLA, Inception: no repeated unit under a stage) is one
    conv-norm unit after another: every site after a spatial conv, else every site.
    """
    blocks: dict[str, list[Site]] = {}
    for site in report.supported:
        if site.block is not None:
            blocks.setdefault(site.block, []).append(site)
    if not blocks:
        return [s for s in report.supported if "after-spatial" in s.roles] or report.supported
    chosen = []
    for sites in blocks.values():
        after = [s for s in sites if "after-spatial" in s.roles]
        before = [s for s in sites if "before-spatial" in s.roles]
        chosen.append(min(after or before or sites, key=lambda s: s.order))
    return chosen


def _with_role(role: str) -> Callable[[SiteReport], list[Site]]:
    return lambda report: [s for s in report.supported if role in s.roles]


@dataclass(frozen=True)
class Placement:
    """A named preset: a rule picking sites from a report."""

    name: str
    description: str
    pick: Callable[[SiteReport], list[Site]]


PLACEMENTS: dict[str, Placement] = {
    p.name: p
    for p in (
        Placement(
            "paper",
            "the paper's: per block the first norm after a spatial conv (ResNet bn2, basic-block "
            "bn1, MobileNetV2 after depthwise), else the first before one (DenseNet norm2), "
            "else the block's first norm; no blocks found (VGG): every norm after a spatial conv",
            _paper,
        ),
        Placement("all", "every supported norm", lambda r: r.supported),
        Placement("last-in-block", "the last norm of each block", _with_role("last-in-block")),
        Placement("after-3x3", "every norm right after a 3x3 conv", _with_role("after-3x3")),
        Placement(
            "after-depthwise",
            "every norm right after a depthwise conv",
            _with_role("after-depthwise"),
        ),
        Placement("none", "no site (add sites with include patterns)", lambda r: []),
    )
}


def _small_large(report: SiteReport) -> tuple[int, int]:
    mobile = _MOBILE.search(f"{report.model_class} {report.model_name or ''}") is not None
    return (5, 10) if mobile else (10, 20)


def default_k(report: SiteReport) -> list[int]:
    """The paper's K per stage: first ceil(n/2) stages small, the rest large (10/20 or 5/10)."""
    small, large = _small_large(report)
    n = report.num_stages
    return [small if i < math.ceil(n / 2) else large for i in range(n)]


def match_pattern(pattern: str, name: str) -> bool:
    """Whole-name match: glob, or regex when ``pattern`` starts with ``re:``.

    Raises:
        NoSitesSelectedError: the regex does not compile.
    """
    if not pattern.startswith("re:"):
        return fnmatch.fnmatchcase(name, pattern)
    try:
        return re.fullmatch(pattern[3:], name) is not None
    except re.error as exc:
        raise NoSitesSelectedError(
            f"pattern {pattern!r} is not a valid regex ({exc}): fix it or use a glob"
        ) from None


def _check_k(value: object, what: str) -> int:
    if not is_integer(value) or not 1 <= value <= MAX_K:
        raise InvalidKError(f"{what} is {value!r}: K must be an integer from 1 to {MAX_K}")
    return int(value)


def _k_per_stage(report: SiteReport, k: int | Sequence[int] | None) -> list[int]:
    n = report.num_stages
    if k is None:
        return default_k(report) or [_small_large(report)[0]]
    if isinstance(k, (numbers.Integral, str)) or not isinstance(k, Iterable):
        return [_check_k(k, "K")] * max(n, 1)
    values = list(k)
    if n == 0:
        raise InvalidKError("K list given but the model has no stages: give a single int")
    if len(values) != n:
        stages = ", ".join(f"{i}={key}" for i, key in enumerate(report.stage_keys)) or "none"
        raise InvalidKError(
            f"K list has {len(values)} values but the model has {n} stages ({stages}): "
            f"give {n} values or a single int"
        )
    return [_check_k(v, f"K for stage {i}") for i, v in enumerate(values)]


def _site_k(report: SiteReport, per_stage: list[int]) -> Callable[[Site], int]:
    first0 = min((s.order for s in report.sites if s.stage == 0), default=math.inf)

    def k_of(site: Site) -> int:
        if site.stage is not None:
            return per_stage[site.stage]
        return per_stage[0] if site.order < first0 else per_stage[-1]

    return k_of


def _filter(
    report: SiteReport,
    sites: list[Site],
    roles: Sequence[str] | None,
    stages: Sequence[int] | None,
    norm_types: Sequence[str] | None,
) -> list[Site]:
    if roles is not None:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise UnknownNameError(f"unknown role {unknown[0]!r}: choose from {', '.join(ROLES)}")
        sites = [s for s in sites if set(roles) & set(s.roles)]
    if stages is not None:
        bad = [i for i in stages if not 0 <= i < report.num_stages]
        if bad and not report.num_stages:
            raise UnknownNameError(
                f"stage {bad[0]} does not exist: the model has no stages (no blocks found): "
                "select its sites by name (include/exclude) or roles instead"
            )
        if bad:
            raise UnknownNameError(
                f"stage {bad[0]} does not exist: the model has {report.num_stages} stages "
                f"(0-{report.num_stages - 1})"
            )
        sites = [s for s in sites if s.stage in set(stages)]
    if norm_types is not None:
        known = {s.norm_type for s in report.sites} | {s.base for s in report.sites}
        unknown = sorted(set(norm_types) - known)
        if unknown:
            raise UnknownNameError(
                f"norm type {unknown[0]!r} is not in this model: "
                f"choose from {', '.join(sorted(known))}"
            )
        sites = [s for s in sites if {s.norm_type, s.base} & set(norm_types)]
    return sites


def _include(report: SiteReport, patterns: Sequence[str]) -> list[Site]:
    added = []
    for pattern in patterns:
        hits = [s for s in report.sites if match_pattern(pattern, s.name)]
        usable = [s for s in hits if s.supported]
        if not usable:
            why = "only unsupported norms" if hits else "no site"
            raise NoSitesSelectedError(
                f"include pattern {pattern!r} matches {why}: run with --list-sites to see names"
            )
        added += usable
    return added


def _listed(name: str, value: Any, kind: type) -> tuple[Any, ...] | None:
    """``value`` as a tuple of ``kind`` items: one item alone too (a string is one name, not
    its letters). Raises TypeError for other items."""
    if value is None:
        return None
    items = (value,) if isinstance(value, kind | str) else value
    try:
        items = tuple(items)
    except TypeError:
        items = (value,)
    bad = [v for v in items if not isinstance(v, kind) or isinstance(v, bool)]
    if bad:
        label = "int" if kind is numbers.Integral else kind.__name__
        raise TypeError(
            f"{name} takes {label} items (one, or a list of them), not "
            f"{type(bad[0]).__name__}: {bad[0]!r}"
        )
    return items


def select_sites(
    report: SiteReport,
    placement: str = "paper",
    *,
    roles: str | Sequence[str] | None = None,
    stages: int | Sequence[int] | None = None,
    norm_types: str | Sequence[str] | None = None,
    include: str | Sequence[str] = (),
    exclude: str | Sequence[str] = (),
    k: int | Sequence[int] | None = None,
) -> dict[str, int]:
    """Choose sites and their K (precedence in the module docstring).

    Args:
        report: From :func:`an_search.rewrite.find_sites`.
        placement: A name in :data:`PLACEMENTS`.
        roles: Keep sites having any of these roles (one name: that role).
        stages: Keep sites in these stage indices (one int: that stage).
        norm_types: Keep sites whose class name or base kind is listed.
        include: Patterns adding supported sites (each must match one; one string: one
            pattern, not its characters).
        exclude: Patterns removing sites (may match none).
        k: One int, one int per stage, or None for :func:`default_k`.

    Returns:
        Site name -> K, in execution order.

    Raises:
        UnknownNameError: unknown placement, role, stage or norm type.
        InvalidKError: K < 1 or a K list whose length is not the number of stages.
        NoSitesSelectedError: nothing selected, a bad regex, or an include matching nothing.
        TypeError: a filter that is not a name (an int) or a list of them.
    """
    roles, norm_types = _listed("roles", roles, str), _listed("norm_types", norm_types, str)
    stages = _listed("stages", stages, numbers.Integral)
    include, exclude = (
        _listed("include", include, str) or (),
        _listed("exclude", exclude, str) or (),
    )
    if placement not in PLACEMENTS:
        raise UnknownNameError(
            f"unknown placement {placement!r}: choose from {', '.join(PLACEMENTS)}"
        )
    if not report.sites:
        raise NoSitesSelectedError(
            "the model has no normalization layer, and AN replaces norms: convert a model with "
            "BatchNorm, GroupNorm or LayerNorm (NF-Nets and ResMLP, for instance, have none)"
        )
    if not report.supported:
        raise NoSitesSelectedError(
            f"none of the model's {len(report.sites)} norms is of a type AN supports: run with "
            "--list-sites to see their types"
        )
    k_of = _site_k(report, _k_per_stage(report, k))
    chosen = _filter(report, PLACEMENTS[placement].pick(report), roles, stages, norm_types)
    names = {s.name for s in chosen} | {s.name for s in _include(report, include)}
    names = {n for n in names if not any(match_pattern(p, n) for p in exclude)}
    if not names:
        parts = [f"placement {placement!r}"]
        if roles is not None or stages is not None or norm_types is not None:
            parts.append(f"filters roles={roles} stages={stages} norm_types={norm_types}")
        if exclude:
            parts.append(f"exclude={list(exclude)}")
        raise NoSitesSelectedError(
            f"{' with '.join(parts)} selects no site "
            f"({len(report.supported)} supported): run with --list-sites and adjust"
        )
    return {s.name: k_of(s) for s in report.sites if s.name in names}
