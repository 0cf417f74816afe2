"""Full retraining of a recipe (a search's winner), and of its unconverted baseline.

Both runs use the same schedule, data and seed, so the final table shows the real gain. Each run
checkpoints every epoch into its own directory and ``resume=True`` continues it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from an_search._digest import file_sha256
from an_search._rng import kept_rng
from an_search._values import is_integer
from an_search.errors import TrainConfigError
from an_search.input_size import check_input_fits
from an_search.layers.attentive_norm import INITS
from an_search.models import create_model
from an_search.rewrite import Recipe, read_recipe, save

from .checkpoint import check_writable, load_checkpoint
from .config import TrainConfig, TrainResult
from .data import DataSpec
from .proxy import OnEpoch, Progress, check_resumable, proxy_train

__all__ = ["RetrainRun", "retrain"]


@dataclass
class RetrainRun:
    """One retrained model: ``an`` (the recipe) or ``baseline`` (the unconverted model)."""

    name: str
    params: int
    result: TrainResult
    checkpoint_dir: Path
    model_dir: Path


def _run_recipe(
    recipe: Recipe, data: DataSpec, img_size: int, checkpoint: str | None, init: str | None
) -> Recipe:
    """The recipe a run builds: sized for the data and the training's image size (a ViT is
    built at the size it trains at); ``init``, else from loaded weights AN starts as the norm
    it replaces (``preserve``), as ``an-convert`` does, since the paper init would discard the
    pretrained affine of every AN site."""
    sizes = {"num_classes": data.num_classes, "in_chans": data.in_chans, "img_size": img_size}
    if init is None:
        init = "preserve" if checkpoint is not None else recipe.init
    return dataclasses.replace(recipe, model_kwargs={**recipe.model_kwargs, **sizes}, init=init)


def _build(recipe: Recipe, *, converted: bool, checkpoint: str | None, seed: int) -> nn.Module:
    """The run's model; the AN one as ``an-convert --recipe`` builds it, so that a checkpoint
    may hold plain weights or a saved AN model's own (fine-tuning it on new data)."""
    from an_search.conversion import convert_recipe

    torch.manual_seed(seed)  # the same initial weights for the AN run and the baseline
    if not converted:
        return create_model(recipe.model, checkpoint=checkpoint, **recipe.model_kwargs)
    sizes = {k: recipe.model_kwargs.get(k) for k in ("num_classes", "in_chans", "img_size")}
    return convert_recipe(
        recipe, checkpoint=checkpoint, init=recipe.init, cost=False, **sizes
    ).model


def retrain(
    recipe: Recipe | str | os.PathLike[str],
    data: DataSpec,
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    baseline: bool = False,
    checkpoint: str | None = None,
    init: str | None = None,
    nproc: int = 1,
    on_epoch: OnEpoch | None = None,
    progress: Progress | None = None,
) -> list[RetrainRun]:
    """Train the recipe's model (and optionally the unconverted one) on the full schedule.

    Args:
        recipe: what to build (``an_search.rewrite.Recipe``, or its ``recipe.json`` or a folder
            holding one; the classifier follows ``data``).
        data: the dataset.
        cfg: the schedule; its ``checkpoint_dir`` is replaced by ``out_dir/<name>``.
        out_dir: run directory; ``an/`` and ``baseline/`` hold each run's checkpoints.
        baseline: also train the unconverted model with the same schedule.
        checkpoint: local weights both runs start from (None: random init, same seed); AN
            then starts as the norm it replaces (``init="preserve"``).
        init: AN's init, ``paper`` or ``preserve``, whatever the weights (e.g. the recipe's
            own, to retrain a trial of a search from a checkpoint as the trial started); None:
            ``preserve`` with a checkpoint, else the recipe's.
        nproc: processes per run; above 1 each run trains under ``torchrun`` (DDP: NCCL on
            CUDA, gloo on CPU) with ``cfg.batch_size`` per process and the lr scaled linearly;
            the final weights come back through rank 0's checkpoint.
        on_epoch: per-epoch callback, as for ``proxy_train``.
        progress: per-update callback, as for ``proxy_train``.

    Returns:
        The runs, the recipe's first; each final model is saved (an-convert format) in
        ``out_dir/<name>/model``.

    The caller's random states (Python's, numpy's, torch's) are put back afterwards.

    Raises:
        TrainConfigError: ``nproc`` below 1, or a setting of ``cfg`` out of range.
    """
    if not isinstance(recipe, Recipe):
        recipe = read_recipe(recipe)
    with kept_rng():
        return _retrain(
            recipe, data, cfg, out_dir, baseline=baseline, checkpoint=checkpoint, init=init,
            nproc=nproc, on_epoch=on_epoch, progress=progress,
        )  # fmt: skip


def _retrain(
    recipe: Recipe,
    data: DataSpec,
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    baseline: bool,
    checkpoint: str | None,
    init: str | None,
    nproc: int,
    on_epoch: OnEpoch | None,
    progress: Progress | None,
) -> list[RetrainRun]:
    if not is_integer(nproc) or nproc < 1:
        raise TrainConfigError(f"nproc is the processes per run, 1 or more: got {nproc!r}")
    if init not in (None, *INITS):
        raise TrainConfigError(f"init is one of {', '.join(INITS)} (or None): got {init!r}")
    dataclasses.replace(cfg, checkpoint_dir=os.fspath(out_dir)).validate()  # (before a folder
    # is made; each run's checkpoint_dir is a folder of out_dir)
    recipe = _run_recipe(recipe, data, cfg.img_size, checkpoint, init)
    # what each run's checkpoints are for: a resume of another recipe's, data's or weights' is
    # refused (paths aside: the data and weights may have moved)
    classes = list(data.class_names) or data.num_classes
    weights = file_sha256(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None
    plain = Recipe.from_selection(model=recipe.model, selected={}, model_kwargs=recipe.model_kwargs)
    plans = [
        (run_dir, dataclasses.replace(cfg, checkpoint_dir=str(run_dir)), converted, final, {
            "recipe": final.to_dict(), "classes": classes, "weights": weights,
        })
        for name, converted, final in [("an", True, recipe), ("baseline", False, plain)]
        for run_dir in [Path(out_dir) / name]
    ][: 2 if baseline else 1]  # fmt: skip
    # every check before any training: an unwritable folder, a resume of another run's
    # checkpoints (the baseline's too: else found after the AN run trained)
    made = _missing_folders([run_dir for run_dir, *_ in plans])
    runs = []
    try:
        for run_dir, run_cfg, _, _, run in plans:
            check_writable(run_dir)
            if cfg.resume and (saved := load_checkpoint(run_dir)) is not None:
                # (here, not in training: under torchrun a rank would find it, after the start)
                check_resumable(run_cfg, saved, run, nproc)
        models = []  # (all built first: the baseline's weights may not load, e.g. a saved AN
        for _, _, converted, _, _ in plans:  # model's, found before the AN run trains)
            model = _build(recipe, converted=converted, checkpoint=checkpoint, seed=cfg.seed)
            check_input_fits(model, (data.in_chans, cfg.img_size, cfg.img_size))
            models.append(model)
        for (run_dir, run_cfg, _, final, run), model in zip(plans, models, strict=True):
            params = sum(p.numel() for p in model.parameters())
            if nproc > 1:
                from .distributed import train_distributed

                result = train_distributed(
                    model, final, data, run_cfg, nproc=nproc, on_epoch=on_epoch, run=run
                ).result
                model.load_state_dict(load_checkpoint(run_dir)["model"])  # rank 0's weights
            else:
                result = proxy_train(
                    model, data, run_cfg, on_epoch=on_epoch, progress=progress, run=run
                )
            model_dir = save(model, final, run_dir / "model")
            runs.append(RetrainRun(run_dir.name, params, result, run_dir, model_dir))
    except BaseException:
        for folder in made:  # (this call's folders, while still empty: nothing to keep)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return runs


def _missing_folders(folders: list[Path]) -> list[Path]:
    """The folders and parents of ``folders`` that do not exist yet, deepest first."""
    missing: list[Path] = []
    for folder in folders:
        for path in (full := folder.absolute(), *full.parents):
            if path.exists():
                break
            if path not in missing:
                missing.append(path)
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)
