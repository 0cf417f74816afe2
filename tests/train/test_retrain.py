"""Full retraining of a recipe and its baseline, in one process and under torchrun (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from an_search.models import create_model
from an_search.rewrite import Recipe, find_sites, load, select_sites
from an_search.train import TrainConfig, resolve_data
from an_search.train.retrain import RetrainRun, retrain


def _recipe() -> Recipe:
    model = create_model("resnet10t", num_classes=10)
    site_k = select_sites(find_sites(model), "paper")
    return Recipe.from_selection(model="resnet10t", selected=site_k, model_kwargs={})


def _cfg() -> TrainConfig:
    return TrainConfig(
        epochs=1, batches_per_epoch=2, batch_size=8, val_fraction=0.02, threads=1,
        scale=(1.0, 1.0), hflip=0.0,
    )  # fmt: skip


def _saved_is_the_last_checkpoint(run: RetrainRun, recipe: Recipe) -> None:
    """The saved model is the trained one: its weights equal (rank 0's) last checkpoint."""
    model, saved = load(run.model_dir)
    assert [s.name for s in saved.sites] == [s.name for s in recipe.sites]
    state = torch.load(run.checkpoint_dir / "last.pth", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_retrain_an_and_baseline(tmp_path: Path) -> None:
    """(Under torchrun: test_resume_of_another_recipes_checkpoints_is_refused[2].)"""
    recipe = _recipe()
    runs = retrain(recipe, resolve_data(None), _cfg(), tmp_path, baseline=True)
    assert [r.name for r in runs] == ["an", "baseline"]
    an, base = runs
    assert an.params > base.params
    assert len(an.result.history) == 1 and 0.0 <= an.result.top1 <= 100.0
    _saved_is_the_last_checkpoint(an, recipe)


@pytest.mark.parametrize("nproc", [0, -1])
def test_retrain_refuses_fewer_than_one_process(nproc: int, tmp_path: Path) -> None:
    from an_search.errors import TrainConfigError

    with pytest.raises(TrainConfigError, match=f"1 or more: got {nproc}"):
        retrain(_recipe(), resolve_data(None), _cfg(), tmp_path / "out", nproc=nproc)
    assert not (tmp_path / "out").exists()


def test_retrain_from_weights_starts_an_as_the_norm_it_replaces(tmp_path: Path) -> None:
    """From a checkpoint, a recipe searched from scratch (init paper) retrains with init
    preserve, as an-convert converts a model with weights: the AN run starts from the
    pretrained function, not from the pretrained weights with new norm affines."""
    from safetensors.torch import save_file

    recipe = _recipe()
    assert recipe.init == "paper"
    weights = create_model("resnet10t", num_classes=10).state_dict()
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(ckpt))
    (an,) = retrain(recipe, resolve_data(None), _cfg(), tmp_path / "out", checkpoint=str(ckpt))
    _, saved = load(an.model_dir)
    assert saved.init == "preserve" and saved.sites == recipe.sites


def test_a_baseline_its_weights_do_not_fit_is_refused_before_the_an_run_trains(
    tmp_path: Path,
) -> None:
    """--baseline with a saved AN model's weights: the unconverted model cannot load them, found
    before any training (before: after the whole AN run had trained)."""
    import an_search
    from an_search.errors import CheckpointError

    saved = an_search.convert("resnet10t", placement="paper", num_classes=10, cost=False)
    an_search.save(saved.model, saved.recipe, tmp_path / "an")
    steps: list[int] = []
    with pytest.raises(CheckpointError, match="holds AttentiveNorm sites"):
        retrain(
            saved.recipe, resolve_data(None), _cfg(), tmp_path / "out", baseline=True,
            checkpoint=str(tmp_path / "an" / "model.safetensors"),
            progress=lambda done, total: steps.append(done),
        )  # fmt: skip
    assert steps == [] and not (tmp_path / "out").exists()


def test_a_recipe_file_is_taken_for_its_recipe(tmp_path: Path) -> None:
    """retrain and convert_recipe take a recipe's file or folder, as the CLI does (before:
    AttributeError: 'str' object has no attribute 'init')."""
    import an_search

    first = an_search.convert("resnet10t", placement="paper", num_classes=10, cost=False)
    an_search.save(first.model, first.recipe, tmp_path / "an")
    assert an_search.convert_recipe(str(tmp_path / "an"), cost=False).recipe == first.recipe
    (run,) = retrain(tmp_path / "an" / "recipe.json", resolve_data(None), _cfg(), tmp_path / "o")
    assert load(run.model_dir)[1].sites == first.recipe.sites


def test_a_vit_recipe_retrains_at_the_size_it_is_given(tmp_path: Path) -> None:
    """A ViT searched at 32 px retrained at 48 px: built at 48 (its position embeddings), and
    the saved recipe says so, so that load() rebuilds what was trained."""
    import an_search

    searched = an_search.convert(
        "vit_tiny_patch16_224", placement="all", k=3, num_classes=10, img_size=32, cost=False
    ).recipe
    cfg = TrainConfig(epochs=1, batches_per_epoch=1, batch_size=8, img_size=48, val_fraction=0.02,
                      threads=1)  # fmt: skip
    (an,) = retrain(searched, resolve_data(None), cfg, tmp_path)
    model, saved = load(an.model_dir)
    assert saved.model_kwargs["img_size"] == 48 and saved.sites == searched.sites
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_retrain_fine_tunes_a_saved_an_model_from_its_own_weights(tmp_path: Path) -> None:
    """--checkpoint of a saved AN model (its converted weights): the AN run starts from them
    (every non-classifier tensor equal before training), with a classifier for the new data."""
    import an_search

    torch.manual_seed(0)
    first = an_search.convert("resnet10t", placement="paper", k=4, num_classes=3, cost=False)
    an_search.save(first.model, first.recipe, tmp_path / "an")
    cfg = TrainConfig(epochs=1, batches_per_epoch=1, batch_size=8, val_fraction=0.02,
                      threads=1, lr=1e-12, warmup_epochs=0)  # fmt: skip
    (run,) = retrain(first.recipe, resolve_data(None), cfg, tmp_path / "out",
                     checkpoint=str(tmp_path / "an" / "model.safetensors"))  # fmt: skip
    model, saved = load(run.model_dir)
    assert saved.model_kwargs["num_classes"] == 10 and saved.sites == first.recipe.sites
    old, new = first.model.state_dict(), model.state_dict()
    assert new["fc.weight"].shape == (10, 512)
    for key, value in old.items():  # one update at lr 1e-12: the weights as loaded
        if not key.startswith("fc.") and value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(new[key], value, rtol=0, atol=1e-9, msg=key)


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_of_another_recipes_checkpoints_is_refused(nproc: int, tmp_path: Path) -> None:
    """Checkpoints remember the run they were saved by: a resume with a recipe that differs in
    nothing that changes a weight's shape (the pool) is refused, not reported as that run; the
    same recipe resumes (nothing left to train: the saved result)."""
    import dataclasses

    from an_search.errors import CheckpointError
    from an_search.rewrite import RecipeSite

    data = resolve_data(None)
    first = _recipe()
    done = retrain(first, data, _cfg(), tmp_path, nproc=nproc)[0]
    assert len(done.result.history) == 1 and 0.0 <= done.result.top1 <= 100.0
    _saved_is_the_last_checkpoint(done, first)
    pooled = [RecipeSite(**{**dataclasses.asdict(s), "pool": "avg"}) for s in first.sites]
    other = dataclasses.replace(first, sites=pooled)
    resume = dataclasses.replace(_cfg(), resume=True)
    with pytest.raises(CheckpointError, match="saved by a run with another recipe: delete"):
        retrain(other, data, resume, tmp_path, nproc=nproc)
    faster = dataclasses.replace(resume, lr=2 * resume.lr)  # (found before torchrun starts)
    with pytest.raises(CheckpointError, match=r"^checkpoint in .*/an has lr=0.4, not 0.8; use"):
        retrain(first, data, faster, tmp_path, nproc=nproc)
    other_count = 3 - nproc  # (found before torchrun starts, as before any training)
    with pytest.raises(
        CheckpointError, match=rf"saved by a run of {nproc} processes, this one has {other_count} "
    ):
        retrain(first, data, resume, tmp_path, nproc=other_count)
    again = retrain(first, data, resume, tmp_path, nproc=nproc)[0]
    assert again.result.history == done.result.history


def test_an_unwritable_output_is_refused_before_training(tmp_path: Path) -> None:
    from an_search.errors import OutputDirError

    (tmp_path / "afile").write_text("not a directory")
    updates: list[int] = []
    with pytest.raises(OutputDirError, match="cannot write checkpoints to .*afile/out/an"):
        retrain(
            _recipe(), resolve_data(None), _cfg(), tmp_path / "afile" / "out",
            progress=lambda done, total: updates.append(done),
        )  # fmt: skip
    assert updates == []  # not one update trained


@pytest.mark.parametrize("weights", ["bad.pth", "missing.pth"])
def test_a_retrain_that_fails_before_training_leaves_no_folders(
    weights: str, tmp_path: Path
) -> None:
    """Nor the output folder and its parents that it made (an existing one is kept)."""
    from an_search.errors import CheckpointError

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "rt" / "deep", tmp_path / "kept"):
        with pytest.raises(CheckpointError):
            retrain(
                _recipe(),
                resolve_data(None),
                _cfg(),
                out,
                baseline=True,
                checkpoint=str(tmp_path / weights),
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "kept"]
    assert list((tmp_path / "kept").iterdir()) == []


def test_an_image_size_below_the_models_downsampling_is_named_before_training(
    tmp_path: Path,
) -> None:
    """(Before: torch's RuntimeError from the first training batch, an internal error.)"""
    import dataclasses

    from an_search.errors import ModelConfigError

    recipe = Recipe.from_selection(
        model="convnext_atto", selected={"stages.0.blocks.0.norm": 4}, model_kwargs={}
    )
    cfg = dataclasses.replace(_cfg(), img_size=16)
    with pytest.raises(ModelConfigError, match=r"^a 16x16 input is too small for this model, "):
        retrain(recipe, resolve_data(None), cfg, tmp_path / "out", baseline=True)
    assert not (tmp_path / "out" / "an").exists()
