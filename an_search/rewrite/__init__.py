"""Find normalization sites with a norm-aware fx tracer, choose where AN goes, swap it in on the
original module tree, and save/load converted models as safetensors plus a JSON recipe.

    >>> report = find_sites(model)
    >>> site_k = select_sites(report, "paper")          # {"layer1.0.bn2": 10, ...}
    >>> apply_an(model, site_k)                          # in place, by module name
"""

from __future__ import annotations

from ._roles import ROLES
from .placement import PLACEMENTS, Placement, default_k, match_pattern, select_sites
from .recipe import (
    LOADING_KWARGS,
    RECIPE_FORMAT,
    RECIPE_VERSION,
    Recipe,
    RecipeSite,
    apply_recipe,
    build_from_recipe,
)
from .saving import RECIPE_FILE, WEIGHTS_FILE, load, read_recipe, save
from .sites import Site, SiteReport, find_sites
from .swap import apply_an, extend_no_weight_decay
from .tracer import SiteTracer, TraceResult, is_norm_module, norm_classes, trace_model

__all__ = [
    "LOADING_KWARGS",
    "PLACEMENTS",
    "RECIPE_FILE",
    "RECIPE_FORMAT",
    "RECIPE_VERSION",
    "ROLES",
    "WEIGHTS_FILE",
    "Placement",
    "Recipe",
    "RecipeSite",
    "Site",
    "SiteReport",
    "SiteTracer",
    "TraceResult",
    "apply_an",
    "apply_recipe",
    "build_from_recipe",
    "default_k",
    "extend_no_weight_decay",
    "find_sites",
    "is_norm_module",
    "load",
    "match_pattern",
    "norm_classes",
    "read_recipe",
    "save",
    "select_sites",
    "trace_model",
]
