"""Recipes (JSON) and save/load of converted models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from an_search.errors import OutputDirError, RecipeError, UnknownModelError
from an_search.layers import AttentiveNorm
from an_search.models import create_model
from an_search.rewrite import (
    RECIPE_FILE,
    WEIGHTS_FILE,
    Recipe,
    RecipeSite,
    apply_an,
    apply_recipe,
    build_from_recipe,
    load,
    save,
)

_SITES = {"layer1.0.bn1": 3, "layer2.0.bn2": 5}


def _recipe(**overrides) -> Recipe:
    fields = dict(
        model="resnet10t",
        model_kwargs={"num_classes": 6},
        sites=[RecipeSite("layer1.0.bn1", 3), RecipeSite("layer2.0.bn2", 5, "bn-sigmoid", "avg")],
        no_weight_decay=True,
    )
    return Recipe(**(fields | overrides))


def _converted(recipe: Recipe) -> torch.nn.Module:
    model = build_from_recipe(recipe)
    model.train()
    with torch.no_grad():  # move running stats and mixtures away from their init
        model(torch.randn(2, 3, 32, 32))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_json_round_trip_and_shape() -> None:
    recipe = _recipe()
    data = json.loads(recipe.to_json())
    assert list(data)[:2] == ["format", "version"] and data["format"] == "an-search-recipe"
    assert data["sites"][1] == {"name": "layer2.0.bn2", "k": 5, "head": "bn-sigmoid", "pool": "avg"}
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_dict(data | {"sites": data["sites"]}).site_k() == _SITES
    selected = Recipe.from_selection(model="resnet10t", selected=_SITES, head="mlp")
    assert [s.head for s in selected.sites] == ["mlp", "mlp"] and selected.init == "paper"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format": "other"}, "format"),
        ({"version": 99}, "version"),
        ({"model": ""}, "model"),
        ({"init": "random"}, "init"),
        ({"sites": [{"name": "a", "k": 0}]}, "K must be"),
        ({"sites": [{"name": "a", "k": 2.0}]}, "K must be"),
        ({"sites": [{"name": "a"}]}, "needs keys"),
        ({"sites": [{"name": "a", "k": 2, "color": "red"}]}, "needs keys"),
        ({"sites": [{"name": "a", "k": 2}, {"name": "a", "k": 3}]}, "twice"),
        ({"model_kwargs": {"act": object()}}, "JSON"),
        ({"model_kwargs": {"pretrained": True}}, "'pretrained' would load weights .*--checkpoint"),
        ({"model_kwargs": {"checkpoint_path": "/w.pth"}}, "'checkpoint_path' would load weights"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_validation_errors(change: dict, match: str) -> None:
    data = _recipe().to_dict() | change
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(data)


def test_from_json_rejects_bad_text() -> None:
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.from_json("{")
    with pytest.raises(RecipeError, match="top level"):
        Recipe.from_json("[1]")
    with pytest.raises(RecipeError, match="timm name"):
        Recipe.from_selection(model=None, selected=_SITES)


def test_build_from_recipe() -> None:
    model = build_from_recipe(_recipe())
    an = model.get_submodule("layer2.0.bn2")
    assert isinstance(an, AttentiveNorm)
    assert (an.k, an.head_name, an.pool_name) == (5, "bn-sigmoid", "avg")
    assert model.num_classes == 6
    assert model.no_weight_decay() == {f"{n}.{p}" for n in _SITES for p in ("weight", "bias")}
    with pytest.raises(RecipeError, match="layer9"):
        build_from_recipe(_recipe(sites=[RecipeSite("layer9.bn1", 3)]))
    with pytest.raises(UnknownModelError):
        build_from_recipe(_recipe(model="resnet_nope"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Recipe, Path]:
    recipe = _recipe()
    model = _converted(recipe)
    return model, recipe, save(model, recipe, tmp_path_factory.mktemp("saved") / "run" / "best")


def test_save_load_identical_outputs(saved) -> None:
    model, recipe, out = saved
    assert sorted(os.listdir(out)) == sorted([WEIGHTS_FILE, RECIPE_FILE])
    loaded, loaded_recipe = load(out)
    assert loaded_recipe == recipe and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # saving again over the same directory replaces the files
    save(model, recipe, out)
    assert sorted(os.listdir(out)) == sorted([WEIGHTS_FILE, RECIPE_FILE])


def test_unwritable_output_dir_leaves_nothing(tmp_path) -> None:
    recipe = _recipe()
    model = build_from_recipe(recipe)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(OutputDirError, match="writable"):
        save(model, recipe, blocker / "out")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    recipe = _recipe()
    model = build_from_recipe(recipe)

    def boom(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OutputDirError, match="No space left"):
        save(model, recipe, tmp_path / "new" / "dir")
    assert os.listdir(tmp_path) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError):
        save(model, recipe, existing)
    assert os.listdir(existing) == ["notes.txt"]


@pytest.mark.parametrize("before", ["a saved model", "nothing"])
def test_a_save_whose_recipe_cannot_be_renamed_leaves_the_folder_as_it_was(
    tmp_path, monkeypatch, before: str
) -> None:
    """The weights are renamed into place first: if the recipe's rename then fails (an
    immutable or foreign-owned recipe.json), the old weights go back, or the new ones go (before:
    the new weights beside the old recipe, a pair that load() refuses)."""
    import an_search

    out = tmp_path / "out"
    old = an_search.convert("resnet10t", placement="paper", k=2, num_classes=6, cost=False)
    if before == "a saved model":
        save(old.model, old.recipe, out)
    else:
        out.mkdir()
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    new = an_search.convert("resnet10t", placement="all", k=3, num_classes=6, cost=False)
    real = os.replace

    def refused(src, dst, *args, **kwargs):
        if Path(dst).name == RECIPE_FILE:
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OutputDirError, match="Operation not permitted"):
        save(new.model, new.recipe, out)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # (no temporaries either)
    if before == "a saved model":
        model, recipe = load(out)
        assert recipe == old.recipe


def test_save_rejects_a_recipe_that_does_not_match(tmp_path) -> None:
    model = create_model("resnet10t", num_classes=6)
    with pytest.raises(RecipeError, match="not an AttentiveNorm"):
        save(model, _recipe(), tmp_path / "out")
    apply_an(model, {"layer1.0.bn1": 4})
    with pytest.raises(RecipeError, match="K=3"):
        save(model, _recipe(sites=[RecipeSite("layer1.0.bn1", 3)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_takes_a_compiled_model_and_names_a_folded_one(tmp_path) -> None:
    """torch.compile's wrapper prefixes every key with ``_orig_mod.``: the model inside is
    saved. A folded model is named as such. (Before: "110 missing keys ... give convert the
    num_classes...", and "not an AttentiveNorm with that K: save ... with the recipe that
    converted it", for the recipe that did.)"""
    import an_search

    result = an_search.convert("resnet10t", placement="paper", k=2, num_classes=6, cost=False)
    save(torch.compile(result.model), result.recipe, tmp_path / "compiled")
    model, _ = load(tmp_path / "compiled")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in result.model.state_dict().items())
    folded = an_search.fold_sites(result.model.eval())
    with pytest.raises(RecipeError, match=r"site 'layer1.0.bn1' is folded \(fold_sites, fuse\)"):
        save(folded, result.recipe, tmp_path / "folded")
    assert not (tmp_path / "folded").exists()


def test_load_errors(tmp_path, saved) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load(tmp_path / "missing")
    _, recipe, good = saved
    out = Path(shutil.copytree(good, tmp_path / "m"))
    (out / RECIPE_FILE).write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load(out)
    (out / RECIPE_FILE).write_text(recipe.to_json())
    (out / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(RecipeError, match="re-export"):
        load(out)
    other = _recipe(sites=[RecipeSite("layer1.0.bn1", 3)])  # weights hold one more AN site
    shutil.copy(good / WEIGHTS_FILE, out / WEIGHTS_FILE)
    (out / RECIPE_FILE).write_text(other.to_json())
    with pytest.raises(RecipeError, match="do not load") as info:
        load(out)
    # the message names what differs: the keys of the AN site the recipe does not have
    assert "unexpected keys (first: layer2.0.bn2." in str(info.value)


def test_save_rejects_a_model_the_recipe_does_not_rebuild(tmp_path) -> None:
    recipe = _recipe()  # num_classes 6
    model = apply_recipe(create_model("resnet10t", num_classes=10), recipe)
    with pytest.raises(RecipeError, match=r"fc.weight \(10, 512\) here, \(6, 512\)"):
        save(model, recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_directory_in_a_files_place_fails_before_anything_is_replaced(tmp_path) -> None:
    recipe = _recipe()
    model = build_from_recipe(recipe)
    (tmp_path / WEIGHTS_FILE).mkdir()
    (tmp_path / RECIPE_FILE).write_text("old")
    with pytest.raises(OutputDirError, match="not a file"):
        save(model, recipe, tmp_path)
    assert (tmp_path / RECIPE_FILE).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE, RECIPE_FILE]


def test_save_of_a_model_that_cannot_be_built_on_meta_checks_its_sites_only(
    tmp_path, monkeypatch
) -> None:
    import an_search.rewrite.saving as saving

    recipe = _recipe()
    model = _converted(recipe)

    def no_meta(recipe: Recipe) -> torch.nn.Module:
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(saving, "build_from_recipe", no_meta)
    save(model, recipe, tmp_path / "out")  # saved: the structure check is skipped, not fatal
    with pytest.raises(RecipeError, match="not an AttentiveNorm"):
        save(model, _recipe(sites=[RecipeSite("layer3.0.bn1", 3)]), tmp_path / "bad")
    monkeypatch.undo()
    loaded, _ = load(tmp_path / "out")
    assert loaded.state_dict().keys() == model.state_dict().keys()
