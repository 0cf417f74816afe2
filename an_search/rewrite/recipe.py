"""Recipes: the JSON description of a converted model, and save/load of converted models.

A saved model is a directory holding ``model.safetensors`` (weights, shared tensors handled by
``safetensors.torch.save_model``) and ``recipe.json`` (base model, its kwargs, sites with K, head,
pool, init). Reload = ``create_model(base, pretrained=False)`` -> apply the recipe -> load the
weights strictly. No pickles, no GraphModules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from an_search._values import is_integer
from an_search.errors import MAX_K, ANSearchError, RecipeError

__all__ = [
    "LOADING_KWARGS",
    "RECIPE_FORMAT",
    "RECIPE_VERSION",
    "Recipe",
    "RecipeSite",
    "apply_recipe",
    "build_from_recipe",
]

RECIPE_FORMAT = "an-search-recipe"
RECIPE_VERSION = 1
_INITS = ("paper", "preserve")
#: ``timm.create_model`` options that would load weights (or download them): a recipe and
#: ``convert``'s model_kwargs take none (weights come from a local file the user names).
LOADING_KWARGS = ("pretrained", "checkpoint_path", "checkpoint")


@dataclass(frozen=True)
class RecipeSite:
    """One AN site of a recipe: module name, K, attention head and pool names."""

    name: str
    k: int
    head: str = "default"
    pool: str = "meanstd"


def _fail(problem: str) -> RecipeError:
    return RecipeError(f"invalid recipe: {problem}: fix recipe.json or re-export the model")


def _site(value: Any) -> RecipeSite:
    if isinstance(value, RecipeSite):
        site = value
    elif isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in fields(RecipeSite)})
        if unknown or "name" not in value or "k" not in value:
            raise _fail(f"site {value!r} needs keys name, k (optional head, pool) only")
        site = RecipeSite(**value)
    else:
        raise _fail(f"site {value!r} is not an object")
    if not isinstance(site.name, str) or not site.name:
        raise _fail(f"site name {site.name!r} is not a module name")
    k = site.k
    if not is_integer(k) or not 1 <= k <= MAX_K:
        raise _fail(f"site {site.name!r} has K={k!r}, K must be an integer from 1 to {MAX_K}")
    if not isinstance(site.head, str) or not isinstance(site.pool, str):
        raise _fail(f"site {site.name!r} head/pool must be names")
    return site


@dataclass
class Recipe:
    """How to rebuild a converted model from a timm name (validated on construction).

    Attributes:
        model: timm model name.
        model_kwargs: Extra ``create_model`` kwargs (num_classes, in_chans, img_size...), JSON-able.
        sites: AN sites (dicts are converted to :class:`RecipeSite`).
        init: ``paper`` or ``preserve`` (weights are loaded afterwards, so mostly informative).
        no_weight_decay: Whether ``model.no_weight_decay()`` names the AN mixture parameters.
        format: Format tag, always ``an-search-recipe``.
        version: Format version (this code reads up to ``RECIPE_VERSION``).

    Raises:
        RecipeError: any field is invalid.
    """

    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    sites: list[RecipeSite] = field(default_factory=list)
    init: str = "paper"
    no_weight_decay: bool = False
    format: str = RECIPE_FORMAT
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.format != RECIPE_FORMAT:
            raise _fail(f"format is {self.format!r}, expected {RECIPE_FORMAT!r}")
        if not isinstance(self.version, int) or not 1 <= self.version <= RECIPE_VERSION:
            raise _fail(f"version {self.version!r} is not supported (max {RECIPE_VERSION})")
        if not isinstance(self.model, str) or not self.model:
            raise _fail(f"model {self.model!r} is not a timm model name")
        if not isinstance(self.model_kwargs, dict):
            raise _fail("model_kwargs is not an object")
        try:
            json.dumps(self.model_kwargs)
        except (TypeError, ValueError):
            raise _fail(f"model_kwargs {self.model_kwargs!r} is not JSON-able") from None
        loads = sorted(self.model_kwargs.keys() & set(LOADING_KWARGS))
        if loads:  # (weights come from a local file the user names: --checkpoint)
            raise _fail(f"model_kwargs {loads[0]!r} would load weights (give them as --checkpoint)")
        if not isinstance(self.sites, list):
            raise _fail("sites is not a list")
        self.sites = [_site(s) for s in self.sites]
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _fail(f"site {dup!r} appears twice")
        if self.init not in _INITS:
            raise _fail(f"init {self.init!r} is not one of {', '.join(_INITS)}")
        if not isinstance(self.no_weight_decay, bool):
            raise _fail("no_weight_decay is not true/false")

    @classmethod
    def from_selection(
        cls,
        *,
        model: str | None,
        selected: dict[str, int],
        model_kwargs: dict[str, Any] | None = None,
        head: str = "default",
        pool: str = "meanstd",
        init: str = "paper",
        no_weight_decay: bool = False,
        prior: Sequence[RecipeSite] = (),
    ) -> Recipe:
        """A recipe with one head and pool for every selected site (``select_sites`` output),
        after the ``prior`` sites (AN sites the model had before, with their own head and pool)."""
        if model is None:
            raise RecipeError(
                "the model has no timm name (no pretrained_cfg): build it by name to save a recipe"
            )
        sites = [*prior, *(RecipeSite(name, int(k), head, pool) for name, k in selected.items())]
        return cls(model, dict(model_kwargs or {}), sites, init, no_weight_decay)

    def site_k(self) -> dict[str, int]:
        """Site name -> K."""
        return {s.name: s.k for s in self.sites}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (format tag and version first)."""
        data = asdict(self)
        return {"format": data.pop("format"), "version": data.pop("version"), **data}

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Build and validate from a dict (e.g. parsed JSON)."""
        if not isinstance(data, dict):
            raise _fail("the top level is not an object")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise _fail(f"unknown key {unknown[0]!r}")
        if "model" not in data:
            raise _fail("missing key 'model'")
        return cls(**data)

    def to_json(self) -> str:
        """Indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """Parse and validate JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)


def apply_recipe(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Convert ``model`` in place as ``recipe`` says (sites grouped by head and pool)."""
    from .swap import apply_an

    groups: dict[tuple[str, str], dict[str, int]] = {}
    for s in recipe.sites:
        groups.setdefault((s.head, s.pool), {})[s.name] = s.k
    for (head, pool), site_k in groups.items():
        try:
            apply_an(
                model,
                site_k,
                head=head,
                pool=pool,
                init=recipe.init,
                no_weight_decay=recipe.no_weight_decay,
            )
        except ANSearchError as exc:
            raise RecipeError(f"recipe does not fit {recipe.model!r}: {exc}") from None
    return model


def build_from_recipe(recipe: Recipe) -> nn.Module:
    """Create ``recipe.model`` (random init, ``pretrained=False``) and apply the recipe.

    Raises:
        UnknownModelError: timm does not know the model.
        RecipeError: a site does not exist in the model or cannot become AN.
    """
    from an_search.models import create_model

    model = create_model(recipe.model, **recipe.model_kwargs)
    return apply_recipe(model, recipe)
