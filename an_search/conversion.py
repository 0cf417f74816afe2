"""The one-call API: build or take a timm model, place AN at chosen sites, report the cost.

>>> result = an_search.convert("resnet50", placement="paper")
>>> result.cost_before.params, result.cost_after.params
(25557032, 25755420)
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._rng import kept_rng
from ._values import SEED_MAX, is_integer
from .cost import CostReport, count_cost
from .errors import CheckpointError, ModelConfigError, RecipeError, UnknownNameError
from .input_size import SHAPE_ERRORS, failure_reason, model_input_size
from .layers.attentive_norm import INITS
from .models import (
    check_model_options,
    classifier_keys,
    create_model,
    describe_mismatch,
    first_convs,
    load_checkpoint,
    pixel_fold,
    read_checkpoint,
)
from .rewrite import (
    LOADING_KWARGS,
    Recipe,
    RecipeSite,
    SiteReport,
    apply_an,
    apply_recipe,
    find_sites,
    read_recipe,
    select_sites,
)

__all__ = [
    "ConvertResult",
    "check_model_kwargs",
    "convert",
    "convert_recipe",
    "recipe_model_kwargs",
]


@dataclass
class ConvertResult:
    """What ``convert`` returns.

    Attributes:
        model: the converted model (the original timm module tree, changed in place).
        recipe: everything needed to rebuild it (see ``an_search.load``).
        report: every normalization site found, with its roles.
        selected: site name -> K for the sites that became AN.
        cost_before: params and MACs of the unconverted model (None when ``cost=False``).
        cost_after: the same for the converted model.
    """

    model: nn.Module
    recipe: Recipe
    report: SiteReport
    selected: dict[str, int]
    cost_before: CostReport | None = None
    cost_after: CostReport | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    extra: dict[str, object] = field(default_factory=dict)


def convert(
    model: str | nn.Module,
    *,
    placement: str = "paper",
    k: int | Sequence[int] | None = None,
    head: str = "default",
    pool: str = "meanstd",
    include: str | Sequence[str] = (),
    exclude: str | Sequence[str] = (),
    roles: str | Sequence[str] | None = None,
    stages: int | Sequence[int] | None = None,
    norm_types: str | Sequence[str] | None = None,
    init: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    no_weight_decay: bool = False,
    cost: bool = True,
    seed: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ConvertResult:
    """Convert a timm model (by name or instance) to use Attentive Normalization.

    Args:
        model: a timm model name (``resnet50``, ``resnet50.a1_in1k``) or a built model.
        placement: preset choosing the sites (``paper``, ``all``, ``last-in-block``,
            ``after-3x3``, ``after-depthwise``, ``none``).
        k: mixture components: one int, one per stage, or None for the preset's K.
        head: attention head registry name.
        pool: pooled statistic feeding the head (``meanstd``, ``avg``, ``avgmax``).
        include: glob (or ``re:`` regex) patterns of site names to add after the filters.
        exclude: patterns of site names to remove; they have the last word.
        roles: keep only sites with one of these roles.
        stages: keep only sites in these stages.
        norm_types: keep only sites of these norm classes.
        init: ``paper`` or ``preserve``; default ``preserve`` when a checkpoint was loaded.
        num_classes: classifier size (a built model gets ``reset_classifier(num_classes)``).
        in_chans: input channels when building by name (a built model must take these).
        img_size: input size for the cost count (and for models built with one).
        checkpoint: local weights file loaded before converting (into a built model too).
        no_weight_decay: name the AN mixture parameters in ``model.no_weight_decay()``.
        cost: count params and MACs before and after (fvcore).
        seed: torch's seed for the random init (the model's by name, AN's, ``preserve``'s
            symmetry-breaking noise), the caller's random states kept (None: torch's as it is).
        model_kwargs: further ``timm.create_model`` options (``global_pool="max"``,
            ``output_stride=16``, ``drop_path_rate=0.1``...), JSON-able, kept in the recipe so
            that ``load`` rebuilds the same model: applied when building by name; for a built
            model, the options it was built with (``save`` refuses a model its recipe does
            not rebuild).

    Returns:
        A ``ConvertResult``; the model is changed in place.
    """
    extra = check_model_kwargs(model_kwargs)
    with _seeded(seed):
        prior: list[RecipeSite] = []
        if isinstance(model, str):
            name = model
            net = create_model(
                model,
                num_classes=num_classes,
                in_chans=in_chans,
                img_size=img_size,
                checkpoint=checkpoint,
                **extra,
            )
            kwargs = {**extra, **_model_kwargs(num_classes, in_chans, img_size)}
        else:
            net = model
            name, prior = _take_built(net, num_classes, in_chans, img_size, checkpoint)
            kwargs = {
                **extra,
                **_model_kwargs(getattr(net, "num_classes", None), _in_chans(net), img_size),
            }
        if init is None:
            init = "preserve" if checkpoint is not None else "paper"
        input_size = model_input_size(net, img_size)
        report = find_sites(net)
        selected = select_sites(
            report,
            placement,
            roles=roles,
            stages=stages,
            norm_types=norm_types,
            include=include,
            exclude=exclude,
            k=k,
        )
        try:
            before = count_cost(net, input_size) if cost else None
        except (*SHAPE_ERRORS, ValueError, ModelConfigError) as exc:
            sizes = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size}
            if isinstance(model, str) and (blamed := _options_error(name, extra, sizes, exc)):
                raise blamed from None
            raise
        apply_an(net, selected, head=head, pool=pool, init=init, no_weight_decay=no_weight_decay)
        after = count_cost(net, input_size) if cost else None
        recipe = Recipe.from_selection(
            model=name,
            model_kwargs=kwargs,
            prior=prior,
            selected=selected,
            head=head,
            pool=pool,
            init=init,
            no_weight_decay=no_weight_decay,
        )
        return ConvertResult(net, recipe, report, selected, before, after, input_size)


def convert_recipe(
    recipe: Recipe | str | os.PathLike[str],
    *,
    model: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    init: str | None = None,
    cost: bool = True,
    seed: int | None = None,
) -> ConvertResult:
    """Convert a timm model as a recipe says (e.g. an ``an-search export`` winner).

    The recipe fixes the sites, their K, heads and pools. Without weights the model is the
    recipe's (its classes, input channels and image size); with a checkpoint it is the
    checkpoint's (the model's own sizes, as for ``convert``: the recipe's come from the search's
    proxy data), unless given here. The checkpoint may hold plain weights (loaded, then
    converted) or the recipe's converted ones (a saved AN model: loaded after converting; built
    at the recipe's sizes where its weights fit them, e.g. a ViT's image size).

    Args:
        recipe: the recipe, or its ``recipe.json`` or a folder holding one (an export's rank
            folder, a saved model), read with ``an_search.rewrite.read_recipe``.
        model: the timm model name (default: the recipe's), e.g. with a pretrained tag.
        num_classes: classifier size (a checkpoint's classifier of another size is dropped).
        in_chans: input channels.
        img_size: input size for the cost count and for models built with one.
        checkpoint: local weights file.
        init: ``paper`` or ``preserve``; default ``preserve`` when a checkpoint is loaded (as
            for ``convert``), else the recipe's (a searched ``init``, if the space had one).
        cost: count params and MACs before and after (fvcore).
        seed: as for :func:`convert`.

    Raises:
        UnknownModelError, UnknownNameError, ModelConfigError, CheckpointError,
        RecipeError: bad recipe sizes, or a site of the recipe that is not in the model.
    """
    if not isinstance(recipe, Recipe):
        recipe = read_recipe(recipe)
    with _seeded(seed):
        name = model or recipe.model
        _check_same_architecture(name, recipe.model)
        if init is None:
            init = "preserve" if checkpoint is not None else recipe.init
        if init not in INITS:
            raise UnknownNameError(f"unknown init {init!r}; use one of: {', '.join(INITS)}")
        sizes = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size}
        kwargs = recipe_model_kwargs(recipe, **sizes, checkpoint=checkpoint)
        net = create_model(name, **kwargs)
        state = None if checkpoint is None else read_checkpoint(checkpoint)
        converted = False
        if state is not None:
            differs = _site_difference(net, recipe, state)
            converted = differs is None
            if differs is not None and any(".attn.head." in k for k in state):
                raise CheckpointError(
                    f"checkpoint {os.fspath(checkpoint)!r} holds AttentiveNorm sites, not this "
                    f"recipe's ({differs}): give the recipe its weights were saved with"
                )
        if converted and (own := recipe_model_kwargs(recipe, **sizes)) != kwargs:
            # a saved AN model, of the recipe's sizes where its weights fit them (a ViT's image
            # size, its classes and input channels): built so, not resampled to timm's defaults
            fits = create_model(name, **own)
            theirs = apply_recipe(copy.deepcopy(fits), recipe).state_dict()
            new_head = classifier_keys(fits, state) if num_classes is not None else set()
            shapes = {k: v.shape for k, v in state.items() if k not in new_head}
            if not describe_mismatch(shapes, theirs, skip=new_head):
                kwargs, net = own, fits
        final = replace(recipe, model=name, model_kwargs=kwargs, init=init)
        input_size = model_input_size(net, kwargs.get("img_size"))
        report = find_sites(net)
        before = count_cost(net, input_size) if cost else None
        new_classifier = num_classes is not None
        if checkpoint is not None and not converted:
            load_checkpoint(net, checkpoint, new_classifier=new_classifier, state=state)
        apply_recipe(net, final)
        if converted:
            load_checkpoint(net, checkpoint, new_classifier=new_classifier, state=state)
        after = count_cost(net, input_size) if cost else None
        return ConvertResult(net, final, report, final.site_k(), before, after, input_size)


def _options_error(
    name: str, extra: dict[str, Any], sizes: dict[str, Any], exc: BaseException
) -> ModelConfigError | None:
    """The error naming ``extra`` (``model_kwargs``) when the model they built fails its
    forward and the model built without them runs the same input (``global_pool=""``, a
    ``drop_rate`` over 1); None otherwise (the size's fault, or a bug: shown as it is)."""
    if not extra:
        return None
    cause = exc.__context__ if isinstance(exc, ModelConfigError) and exc.__context__ else exc
    try:
        plain = create_model(name, **sizes)
        with torch.no_grad():
            plain.eval()(torch.zeros(1, *model_input_size(plain, sizes["img_size"])))
    except Exception:  # (the failure is not the options': the first error stands)
        return None
    shown = ", ".join(f"{k}={v!r}" for k, v in extra.items())
    return ModelConfigError(
        f"{name} built with model_kwargs {shown} fails on its input ({failure_reason(cause)}), and "
        "runs without them: drop or fix these options"
    )


def _check_same_architecture(name: str, recipe_model: str) -> None:
    """A recipe's sites are its model's: another architecture (resnet34 for a resnet18 recipe,
    whose sites it has too) would be converted at half of its sites, silently."""
    from timm.models import split_model_name_tag

    if not isinstance(name, str):
        return  # (create_model's own error)
    arch, want = split_model_name_tag(name)[0], split_model_name_tag(recipe_model)[0]
    if arch != want:
        raise RecipeError(
            f"the recipe converts {want}, not {arch}: leave MODEL out (or give {want} with a "
            f"pretrained tag, {want}.TAG); for {arch}, convert by placement or site names"
        )


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """The block with torch seeded by ``seed`` and the caller's random states put back after
    it; None: the block as it is."""
    if seed is None:
        yield
        return
    if not is_integer(seed) or not 0 <= seed <= SEED_MAX:
        raise ModelConfigError(f"seed must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    with kept_rng():
        torch.manual_seed(seed)
        yield


def recipe_model_kwargs(
    recipe: Recipe,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> dict[str, object]:
    """The ``create_model`` kwargs :func:`convert_recipe` builds with: the recipe's, less its
    sizes when a checkpoint gives the model (its own sizes), then the sizes given here.

    Raises:
        RecipeError: the recipe's sizes are not ones a model can take.
    """
    own = dict(recipe.model_kwargs)
    sizes = {k: own.pop(k) for k in _SIZES if k in own}
    try:
        check_model_options(**sizes)
    except ModelConfigError as exc:
        raise RecipeError(f"invalid recipe: {exc} in model_kwargs: fix recipe.json") from None
    given = _model_kwargs(num_classes, in_chans, img_size)
    return {**own, **({} if checkpoint is not None else sizes), **given}


def _site_difference(
    net: nn.Module, recipe: Recipe, state: Mapping[str, torch.Tensor]
) -> str | None:
    """None where ``state`` holds the converted model's AN sites (every key and shape); else
    the first difference."""
    sites = tuple(f"{s.name}." for s in recipe.sites)
    stored = sorted({k.split(".attn.head.")[0] for k in state if ".attn.head." in k})
    extra = [name for name in stored if f"{name}." not in sites]
    if extra:
        return f"site {extra[0]} stored, not in the recipe"
    theirs = apply_recipe(copy.deepcopy(net), recipe).state_dict()
    keys = [k for k in theirs if k.startswith(sites)]
    for k in keys:
        if k not in state:
            return f"{k} missing"
        if state[k].shape != theirs[k].shape:
            return f"{k} {tuple(state[k].shape)} stored, {tuple(theirs[k].shape)} in the recipe's"
    return None if keys else "the recipe has no site"


def _take_built(
    net: nn.Module,
    num_classes: int | None,
    in_chans: int | None,
    img_size: int | None,
    checkpoint: str | os.PathLike[str] | None,
) -> tuple[str, list[RecipeSite]]:
    """A built model's timm name and AN sites, after ``num_classes`` and ``checkpoint``.

    Everything is checked before the model changes: a model without a timm name, with folded
    sites, or taking other input channels than ``in_chans`` raises and stays as it was.
    """
    from .layers import AttentiveNorm, FoldedAttentiveNorm

    name = (getattr(net, "pretrained_cfg", None) or {}).get("architecture")
    if not isinstance(name, str):
        raise RecipeError(
            "the model has no timm name (no pretrained_cfg): build it with timm.create_model, "
            "or pass its name to convert"
        )
    check_model_options(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    modules = dict(net.named_modules())
    folded = [n for n, m in modules.items() if isinstance(m, FoldedAttentiveNorm)]
    if folded:
        raise ModelConfigError(
            f"the model has folded AN sites ({folded[0]}, ...; fold_sites): convert the model "
            "before folding it"
        )
    if in_chans is not None and in_chans != _in_chans(net):
        raise ModelConfigError(
            f"the model takes {_in_chans(net)} input channels, not in_chans={in_chans}: build it "
            "with timm.create_model(..., in_chans=...), or pass its name to convert"
        )
    if num_classes is not None and num_classes != getattr(net, "num_classes", num_classes):
        net.reset_classifier(num_classes)  # type: ignore[operator]
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, new_classifier=num_classes is not None)
    prior = [
        RecipeSite(n, m.k, m.head_name, m.pool_name)
        for n, m in modules.items()
        if isinstance(m, AttentiveNorm)
    ]
    return name, prior


def _in_chans(net: nn.Module) -> int | None:
    """Input channels of a built timm model: its first conv's (:func:`first_convs`), or None.

    A ``SpaceToDepth`` stem before it (TResNet) folds each block of pixels into channels: the
    conv takes ``block ** 2`` times the image's channels (:func:`~.models.pixel_fold`)."""
    for conv in first_convs(net):
        try:
            channels = getattr(net.get_submodule(conv), "in_channels", None)
        except AttributeError:
            continue
        if isinstance(channels, int):
            return channels // pixel_fold(net)
    return getattr(net, "in_chans", None)


#: The model_kwargs that size a model: a checkpoint's model keeps its own.
_SIZES = ("num_classes", "in_chans", "img_size")


def check_model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``convert``'s further timm options, checked: JSON-able (a recipe keeps them), and none
    that ``convert`` takes by name or that would download.

    Raises:
        ModelConfigError: a problem with them.
    """
    extra = dict(model_kwargs or {})
    taken = sorted(extra.keys() & {*_SIZES, *LOADING_KWARGS})
    if taken:
        raise ModelConfigError(
            f"model_kwargs {taken[0]!r}: give num_classes, in_chans, img_size and checkpoint as "
            "convert's own arguments (weights come from a local checkpoint)"
        )
    try:
        json.dumps(extra)
    except (TypeError, ValueError):
        raise ModelConfigError(
            f"model_kwargs {extra!r} is not JSON-able (a recipe keeps them): give plain values "
            "(numbers, strings, lists)"
        ) from None
    return extra


def _model_kwargs(
    num_classes: int | None, in_chans: int | None, img_size: int | None
) -> dict[str, int]:
    kw = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size}
    return {k: v for k, v in kw.items() if v is not None}
