"""``an-search retrain``: a recipe (or a study's best) on the full schedule."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import Debug, JsonOut, Quiet, handle_errors, on_interrupt, print_json, stderr, stdout
from ._options import (
    BatchesPerEpoch,
    BatchSize,
    Checkpoint,
    Dataset,
    Device,
    ImgSize,
    Storage,
    StudyName,
)
from ._study import STUDY_FILES, open_run

if TYPE_CHECKING:
    import optuna


@handle_errors
def retrain(
    source: Annotated[
        Path | None, typer.Argument(help="recipe.json (or its folder), or a run directory")
    ] = None,
    storage: Storage = None,
    study_name: StudyName = None,
    data: Annotated[
        str | None, typer.Option(help="the dataset (default: the study's, else embedded)")
    ] = None,
    dataset: Dataset = "",
    epochs: Annotated[int, typer.Option(help="full-schedule epochs")] = 10,
    batches_per_epoch: BatchesPerEpoch = None,
    img_size: ImgSize = 32,
    batch_size: BatchSize = 64,
    lr: Annotated[float | None, typer.Option(help="peak lr for a batch of 256")] = None,
    ema: Annotated[float | None, typer.Option(help="EMA decay, e.g. 0.999")] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="also train the unconverted model")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from checkpoints")] = False,
    nproc: Annotated[
        int, typer.Option(help="processes per run under torchrun (GPUs; gloo on CPU)")
    ] = 1,
    checkpoint: Checkpoint = None,
    from_scratch: Annotated[
        bool,
        typer.Option("--from-scratch", help="random init, not the weights the study started from"),
    ] = False,
    device: Device = "cpu",
    seed: Annotated[int, typer.Option(help="training seed (both runs start alike)")] = 0,
    output: Annotated[Path | None, typer.Option(help="retrain directory")] = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Train a recipe (or the study's best) on the full schedule; --baseline for the gain."""
    import dataclasses

    from an_search.train import TrainConfig, resolve_data
    from an_search.train.retrain import retrain as run_retrain

    if from_scratch and checkpoint is not None:
        from an_search.errors import TrainConfigError

        raise TrainConfigError(
            "--from-scratch starts from random init, --checkpoint from weights: give one of them"
        )

    def say(note: str) -> None:
        if not (quiet or json_out):
            stderr().print(note, highlight=False, soft_wrap=True)

    recipe, where, study, chosen = _recipe_from(source, storage, study_name, say)
    if chosen is not None and not (quiet or json_out):
        stderr().print(f"recipe: {chosen}", highlight=False, soft_wrap=True)
    searched_on = _searched_on(study) if study is not None else None
    cfg = TrainConfig(
        epochs=epochs,
        batches_per_epoch=batches_per_epoch,
        img_size=img_size,
        batch_size=batch_size,
        seed=seed,
        device=device,
        ema_decay=ema,
        resume=resume,
        checkpoint_dir=".",
    )
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    if searched_on is not None and not dataset:  # the study's dataset, not the embedded one
        dataset = searched_on[1]  # (a --data alone: the same dataset's files elsewhere)
        if data is None:
            from an_search.search import check_study_data

            data = searched_on[0]
            check_study_data(data)
    init = None  # (AN as the loaded norms with a --checkpoint)
    if checkpoint is None and study is not None and not from_scratch:  # as its data: the study's
        from an_search.search import study_checkpoint

        found = study_checkpoint(study)
        checkpoint = Path(found) if found is not None else None
        init = recipe.init if found is not None else None  # (as the trial started)
        if found is not None and not (quiet or json_out):
            stderr().print(
                f"weights: {found} (the study's; --checkpoint for others, --from-scratch for "
                "random init)"
            )
    if not (quiet or json_out):
        shown = f"{dataset} in {data}" if dataset else data or "the embedded Animal-MNIST"
        whose = " (the study's; --data for another)" if searched_on is not None else ""
        stderr().print(f"data: {shown}{whose}")
    spec = resolve_data(data, name=dataset)
    if (note := spec.unseen_note()) and not (quiet or json_out):
        stderr().print(note, highlight=False, soft_wrap=True)
    classes = recipe.model_kwargs.get("num_classes")
    if data is None and not dataset and classes not in (None, spec.num_classes):
        from an_search.errors import DataError

        raise DataError(
            f"the recipe's model has {classes} classes, the embedded data {spec.num_classes}: "
            "pass --data with the dataset it was searched on"
        )
    if classes not in (None, spec.num_classes) and not (quiet or json_out):
        stderr().print(
            f"note: the recipe's model has {classes} classes, this data {spec.num_classes}: "
            "its classifier is made for the data",
            highlight=False,
            soft_wrap=True,
        )
    from ._progress import TrialProgress

    out_dir = output or (where / "retrain")
    if resume and not list(Path(out_dir).glob("*/last.pth")):
        stderr().print(
            f"note: --resume found no checkpoint in {out_dir}: training from the start",
            highlight=False,
            soft_wrap=True,
        )

    started = time.time()

    def kept() -> str:  # (a plain re-run starts again: say how to continue)
        saved = [p.stat().st_mtime for p in Path(out_dir).glob("*/last.pth")]
        if any(t >= started for t in saved) or (resume and saved):  # (this run's, or the ones
            # it resumed; not an earlier run's, which another schedule would not resume)
            return f"checkpoints are kept in {out_dir}: re-run with --resume to continue"
        return "no epoch had ended, so there is no checkpoint to resume from (re-run to start)"

    with on_interrupt(kept, debug):
        with TrialProgress(
            stderr(), total=None, enabled=not (quiet or json_out), trials=False,
            step_label="training",
        ) as bar:  # fmt: skip
            runs = run_retrain(
                recipe,
                spec,
                cfg,
                out_dir,
                baseline=baseline,
                checkpoint=str(checkpoint) if checkpoint else None,
                init=init,
                nproc=nproc,
                progress=bar.on_step,
            )
    rows = [
        {
            "run": r.name,
            "params": r.params,
            "top1": r.result.top1,
            "top5": r.result.top5,
            "ema_top1": r.result.history[-1].get("ema_top1") if r.result.history else None,
            "epochs": len(r.result.history),
            "wall_s": r.result.wall_s,
            "model_dir": str(r.model_dir),
        }
        for r in runs
    ]
    if json_out:
        print_json({"model": recipe.model, "runs": rows})
        return
    from rich.table import Table

    table = Table(title=f"retrained {recipe.model} ({len(recipe.sites)} AN sites), {epochs} epochs")
    ema = any(r["ema_top1"] is not None for r in rows)  # (--ema: the EMA's, in last.pth)
    for col in ("run", "M params", "top1", "top5", *(["EMA top1"] if ema else []), "wall s"):
        table.add_column(col)
    table.add_column("saved to")
    for r in rows:
        table.add_row(
            r["run"], f"{r['params'] / 1e6:.3f}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
            *([f"{r['ema_top1']:.2f}"] if ema else []), f"{r['wall_s']:.0f}",
            str(r["model_dir"]),
        )  # fmt: skip
    stdout().print(table)
    if len(rows) == 2:
        stdout().print(
            f"gain of AN over the baseline: {rows[0]['top1'] - rows[1]['top1']:+.2f} top-1"
        )


def _recipe_from(
    source: Path | None,
    storage: str | None,
    study_name: str | None,
    say: Callable[[str], None],
) -> tuple[Any, Path, optuna.Study | None, str | None]:
    """A recipe file/folder, or the study's best AN configuration (``export``'s rank 1); with
    the folder for outputs, the study it came from (a recipe file's: ``--storage`` and
    ``--study-name``'s, else its run directory's if ``export`` wrote it there; None: neither)
    and, for the study's best, which trial it is."""
    from an_search.errors import RecipeError, StorageError
    from an_search.rewrite import RECIPE_FILE, Recipe, read_recipe

    study_file = source is not None and source.suffix in STUDY_FILES and source.is_file()
    if (
        source is not None
        and not study_file
        and (source.is_file() or (source / RECIPE_FILE).is_file())
    ):
        file = source if source.is_file() else source / RECIPE_FILE
        recipe = read_recipe(file)
        if storage is not None:  # the study it came from
            study = open_run(None, storage, study_name)[0]
        else:
            study = _exported_from(file.parent, study_name, say)
        searched = None if study is None else study.user_attrs.get("model")
        if searched is not None and searched != recipe.model:
            raise StorageError(
                f"study {study.study_name!r} searched {searched}, the recipe converts "
                f"{recipe.model}: give the --storage and --study-name of the study it came from"
            )
        return recipe, file.parent, study, None
    study, _, where = open_run(source, storage, study_name)
    from an_search.search import ranked_trials

    ranked = ranked_trials(study)
    if not ranked:
        raise RecipeError(
            f"study {study.study_name!r} has no finished, feasible trial with AN to retrain yet"
        )
    best = ranked[0]
    top1 = best.values[0]  # (objectives start with top1; .value raises for several)
    return (
        Recipe.from_dict(best.user_attrs["recipe"]),
        where,
        study,
        (
            f"trial {best.number} of study {study.study_name!r} (export's rank 1 of "
            f"{len(ranked)}, proxy top-1 {top1:.2f})"
        ),
    )


def _searched_on(study: optuna.Study) -> tuple[str | None, str] | None:
    """The study's data path and timm dataset name (None: the embedded data)."""
    config = study.user_attrs.get("config") or {}
    data, dataset = config.get("data"), config.get("dataset") or ""
    return (data, dataset) if data or dataset else None


def _exported_from(
    folder: Path, study_name: str | None, say: Callable[[str], None]
) -> optuna.Study | None:
    """For a recipe that ``an-search export`` wrote into RUN_DIR/export/rank*: the study in
    RUN_DIR (``study_name``, or its one study; None: another recipe, or a run directory
    without a study file: said, as the study's data and weights then go unused)."""
    from an_search.search import open_study
    from an_search.search.storage import DEFAULT_DB_NAME, DEFAULT_JOURNAL_NAME

    run_dir = folder.parent.parent
    if folder.parent.name != "export" or not folder.name.startswith("rank"):
        return None
    if any((run_dir / name).is_file() for name in (DEFAULT_DB_NAME, DEFAULT_JOURNAL_NAME)):
        return open_study(run_dir, study_name)  # (its errors say what is wrong there)
    say(
        f"note: {run_dir} holds no study file (its study is in another storage), so the "
        "study's data and starting weights are not used: give its --storage and "
        "--study-name to use them"
    )
    return None
