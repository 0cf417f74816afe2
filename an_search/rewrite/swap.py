"""Swap chosen norm modules for AttentiveNorm, in place, on the ORIGINAL module tree.

Replacing children by name (as ``torch/fx/experimental/optimization.py`` does with
``_parent_name``) keeps everything a GraphModule would lose: ``reset_classifier``,
``pretrained_cfg``/``default_cfg``, ``forward_features``, ``no_weight_decay``, train/eval
branches and stochastic depth.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from torch import nn

from an_search._values import is_integer
from an_search.errors import MAX_K, InvalidKError, UnknownNameError

from .tracer import is_norm_module

__all__ = ["apply_an", "extend_no_weight_decay"]


def _parent_name(target: str) -> tuple[str, str]:
    """Split a qualified name into (parent name, child attribute): ``a.b.c`` -> (``a.b``, ``c``)."""
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnknownNameError(
            f"no module named {name!r} in {type(model).__name__}: run with --list-sites "
            "to see the site names"
        ) from None


def _no_weight_decay(model: nn.Module) -> set[str]:
    """The class's ``no_weight_decay()`` names plus those :func:`extend_no_weight_decay` added."""
    own = getattr(type(model), "no_weight_decay", None)
    base = set(own(model)) if callable(own) else set()
    return base | set(vars(model).get("_an_no_weight_decay", ()))


def extend_no_weight_decay(model: nn.Module, names: Iterable[str]) -> None:
    """Make ``model.no_weight_decay()`` also return ``names`` (keeping the class's own names).

    timm's optimizer factory puts 2-D tensors under weight decay unless this method names them.
    The instance gets a picklable ``functools.partial``; the class is untouched.
    """
    model._an_no_weight_decay = frozenset(vars(model).get("_an_no_weight_decay", ())) | set(names)
    model.no_weight_decay = functools.partial(_no_weight_decay, model)


def apply_an(
    model: nn.Module,
    site_k: Mapping[str, int],
    *,
    head: str = "default",
    pool: str = "meanstd",
    init: str = "paper",
    no_weight_decay: bool = False,
) -> nn.Module:
    """Replace each named norm with ``AttentiveNorm.from_norm(norm, k, ...)``, in place.

    Args:
        model: The model to change (not copied).
        site_k: Qualified norm module name -> K (from :func:`select_sites`).
        head: Attention head registry name.
        pool: Pooled statistic name (``meanstd``, ``avg``, ``avgmax``).
        init: ``paper`` (reference init) or ``preserve`` (same function as the old norm).
        no_weight_decay: Also name each AN's (K, C) ``weight``/``bias`` in
            ``model.no_weight_decay()`` so timm's optimizer factory does not decay them.

    Returns:
        ``model`` itself. Every name is checked before any module changes.

    Raises:
        UnknownNameError: a name is missing, not a norm, or of an unsupported norm class; or an
            unknown head/pool.
        InvalidKError: a K below 1.
    """
    from an_search.layers import AttentiveNorm, is_supported_norm

    olds = {}
    for name, k in site_k.items():
        if not is_integer(k) or not 1 <= k <= MAX_K:
            raise InvalidKError(f"K for {name!r} is {k!r}: K must be an integer from 1 to {MAX_K}")
        old = _get(model, name)
        if not name or not is_norm_module(old):
            raise UnknownNameError(
                f"{name!r} is a {type(old).__name__}, not a norm: run --list-sites for sites"
            )
        if not is_supported_norm(old):
            raise UnknownNameError(
                f"{name!r} ({type(old).__name__}) cannot become AN: pick a supported site"
            )
        olds[name] = old
    # from_norm copies device, dtype and train/eval mode; build all before changing anything
    news = {
        name: AttentiveNorm.from_norm(old, int(site_k[name]), head=head, pool=pool, init=init)
        for name, old in olds.items()
    }
    for name, new in news.items():
        parent, child = _parent_name(name)
        setattr(model.get_submodule(parent), child, new)
    if no_weight_decay and news:
        extend_no_weight_decay(model, [f"{n}.{p}" for n in news for p in ("weight", "bias")])
    return model
