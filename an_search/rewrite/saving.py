"""Save and load converted models: ``model.safetensors`` + ``recipe.json`` in one directory.

Writes are atomic per file (:func:`an_search._atomic.replacing`): both files are written under
temporary names in the target directory and moved into place only when both are complete; on
any error the temporaries (and a directory this call created) are removed, so nothing
half-written is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from torch import nn

from an_search._atomic import replacing, restored_on_error
from an_search.errors import OutputDirError, RecipeError

from .recipe import Recipe, build_from_recipe

__all__ = ["RECIPE_FILE", "WEIGHTS_FILE", "load", "read_recipe", "save"]

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"


def _first_missing(path: Path) -> Path | None:
    """The outermost ancestor of ``path`` (or itself) that does not exist yet."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _check_matches(model: nn.Module, recipe: Recipe) -> None:
    """The recipe rebuilds ``model``: its sites are AN with their K, and the model it builds
    (on the meta device: no memory, no init) has the same state dict keys and shapes."""
    import torch

    from an_search.layers import AttentiveNorm, FoldedAttentiveNorm
    from an_search.models import describe_mismatch

    for site in recipe.sites:
        try:
            module = model.get_submodule(site.name)
        except AttributeError:
            module = None
        if isinstance(module, FoldedAttentiveNorm):
            raise RecipeError(
                f"site {site.name!r} is folded (fold_sites, fuse): a folded model is for "
                "deployment, not saving; save the model before folding, and fold it after load"
            )
        if not isinstance(module, AttentiveNorm) or module.k != site.k:
            raise RecipeError(
                f"recipe site {site.name!r} (K={site.k}) is not an AttentiveNorm with that K in "
                "the model: save the model together with the recipe that converted it"
            )
    try:
        with torch.device("meta"):
            rebuilt = build_from_recipe(recipe)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: sites checked only
        return
    here = {k: v.shape for k, v in model.state_dict().items()}
    problems = describe_mismatch(here, rebuilt.state_dict(), sides=("here", "in the model"))
    if problems:
        raise RecipeError(
            f"the recipe does not rebuild this model ({problems}; "
            "'missing' = in the rebuilt model only): convert the model by name, or give convert "
            "the num_classes/in_chans/img_size the model was built with"
        )
    other = _other_module(model, rebuilt)
    if other:
        raise RecipeError(
            f"the recipe does not rebuild this model ({other}): it was built with other timm "
            "options (global_pool, output_stride, act_layer...), which its name does not carry: "
            "give them to convert, with the model or its name (model_kwargs={...})"
        )


def _other_module(model: nn.Module, rebuilt: nn.Module) -> str | None:
    """The first module of ``model`` that computes otherwise than ``rebuilt``'s: another
    class or settings (``extra_repr``: pool type, stride, dilation, eps...), described; None
    if none does. What only training sees is left out: a norm's momentum, dropout rates, and
    SyncBatchNorm for BatchNorm (``convert_sync_batchnorm`` for DDP)."""
    theirs = dict(rebuilt.named_modules())
    for name, module in model.named_modules():
        other = theirs.get(name)
        if other is None:
            continue  # (parameters and buffers were compared: a module without any)
        mine, rebuilt_one = _describe(module), _describe(other)
        if mine != rebuilt_one:
            shown = f"{type(module).__name__}({module.extra_repr()})"
            there = f"{type(other).__name__}({other.extra_repr()})"
            return f"{name or 'the model'} is {shown} here, {there} in the rebuilt model"
    return None


_TRAINING_ONLY = re.compile(r",?\s*momentum=[^,)]*")


def _describe(module: nn.Module) -> str:
    """A module's class and the settings that change its evaluation."""
    kind = type(module).__name__
    if kind.startswith("Drop") or "Dropout" in kind:  # (Dropout*, DropPath, DropBlock2d)
        return "dropout"
    if re.fullmatch(r"SyncBatchNorm|BatchNorm[123]d", kind):
        kind = "BatchNorm"
    return f"{kind}({_TRAINING_ONLY.sub('', module.extra_repr())})"


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DistributedDataParallel's wrappers (whose state
    dicts prefix every key with ``_orig_mod.`` or ``module.``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save(model: nn.Module, recipe: Recipe, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` and ``recipe.json`` into ``directory`` (created if needed).

    Args:
        model: A model converted as ``recipe`` says (also under ``torch.compile`` or
            DistributedDataParallel: the model inside is saved).
        recipe: Its recipe.
        directory: Output directory; existing files of the same names are replaced.

    Returns:
        The directory path.

    Raises:
        OutputDirError: the directory cannot be created or written.
        RecipeError: the recipe does not describe the model.
    """
    from safetensors.torch import save_model

    model = unwrapped(model)
    _check_matches(model, recipe)
    out = Path(directory)
    for target in (out / WEIGHTS_FILE, out / RECIPE_FILE):
        if target.exists() and not target.is_file():
            raise OutputDirError(
                f"{str(target)!r} exists and is not a file: remove it or choose another directory"
            )
    created = _first_missing(out)
    done = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        # the recipe is moved into place last: should its rename fail, the old weights go back
        with restored_on_error(out / WEIGHTS_FILE), replacing(out / RECIPE_FILE) as meta:
            with replacing(out / WEIGHTS_FILE) as weights:
                save_model(model, weights)
                Path(meta).write_text(recipe.to_json())
        done = True
    except OSError as exc:
        raise OutputDirError(
            f"cannot write to {str(out)!r} ({exc.strerror or exc}): choose a writable directory"
        ) from None
    finally:
        if not done and created is not None:
            shutil.rmtree(created, ignore_errors=True)
    return out


def read_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read a recipe: a ``recipe.json`` file, or a folder holding one (an ``an-search export``
    rank folder, a saved model).

    Raises:
        RecipeError: no such file, unreadable, or not a valid recipe.
    """
    file = Path(path)
    if file.is_dir():
        file = file / RECIPE_FILE
    if not file.is_file():
        raise RecipeError(
            f"no recipe at {str(file)!r}: give a recipe.json, or a folder holding one (an "
            "`an-search export` rank folder)"
        )
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read {str(file)!r} ({exc}): re-export the recipe") from None
    return Recipe.from_json(text)


def load(directory: str | os.PathLike[str]) -> tuple[nn.Module, Recipe]:
    """Rebuild a saved model: create it by name, apply the recipe, load the weights strictly.

    Returns:
        (model in eval mode, recipe).

    Raises:
        RecipeError: missing or corrupt files, or weights that do not fit the recipe.
        UnknownModelError: the recipe names a model timm does not know.
    """
    from safetensors.torch import load_model

    path = Path(directory)
    recipe_path, weights_path = path / RECIPE_FILE, path / WEIGHTS_FILE
    for p in (recipe_path, weights_path):
        if not p.is_file():
            raise RecipeError(
                f"{str(p)!r} does not exist: pass a directory written by an_search save/an-convert"
            )
    try:
        text = recipe_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(
            f"cannot read {str(recipe_path)!r} ({exc}): re-export the model"
        ) from None
    recipe = Recipe.from_json(text)
    model = build_from_recipe(recipe)
    try:
        load_model(model, weights_path, strict=True)
    except Exception as exc:  # safetensors raises its own error type, or RuntimeError on mismatch
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise RecipeError(
            f"weights in {str(weights_path)!r} do not load into the recipe's model "
            f"({_stored_mismatch(weights_path, model) or first}): re-export the model with its "
            "recipe"
        ) from None
    return model.eval(), recipe


def _stored_mismatch(weights_path: Path, model: nn.Module) -> str:
    """What differs between a weights file's keys and shapes and ``model``'s ("" if unreadable)."""
    from safetensors import safe_open

    from an_search.models import describe_mismatch

    try:
        with safe_open(weights_path, framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - safetensors raises its own error types
        return ""
    return describe_mismatch(shapes, model.state_dict())
