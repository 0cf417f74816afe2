"""``an-search``: Optuna study over AN placement, K and head; reports, exports, retraining."""

from __future__ import annotations

import os
import shlex
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ._common import (
    Debug,
    Group,
    JsonOut,
    Quiet,
    fail,
    handle_errors,
    on_interrupt,
    print_json,
    split_list,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    import optuna

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    cls=Group,
    help="Search where and how to use Attentive Normalization in a timm model (Optuna).",
)

Storage = Annotated[
    str | None,
    typer.Option(help="Optuna storage URL, journal file (.log) or SQLite file; $OPTUNA_STORAGE"),
]
NewStudyName = Annotated[
    str | None,
    typer.Option(help="study name (default: MODEL-SPACE, and -OBJECTIVES unless top1 alone)"),
]
StudyName = Annotated[
    str | None, typer.Option(help="study name (needed when the storage holds several)")
]
Data = Annotated[
    str | None,
    typer.Option(
        help="image folder (train/ and val/, or class folders) or .tar of class folders "
        "(default: the embedded Animal-MNIST)"
    ),
]
BatchesPerEpoch = Annotated[int | None, typer.Option(help="cap updates/epoch")]
ImgSize = Annotated[int, typer.Option(help="training image size")]
BatchSize = Annotated[int, typer.Option(help="images per update (per process)")]
Checkpoint = Annotated[Path | None, typer.Option(help="local weights to start from")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N")]
Seed = Annotated[int, typer.Option(help="sampler and training seed")]
TOP = 20  # table rows of a report besides the baselines (report --top)
RunDir = Annotated[Path | None, typer.Argument(help="run directory of an earlier `an-search run`")]
Workers = Annotated[
    int | None, typer.Option(help="worker processes sharing the study (default: 1 per GPU group)")
]
Gpus = Annotated[str | None, typer.Option(help="GPU ids, e.g. 0,1,2,3 (one worker per group)")]
GpusPerTrial = Annotated[
    int, typer.Option(help="GPUs per trial: above 1, DDP under torchrun (CPU: gloo processes)")
]
SyncBN = Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm in DDP trials (CUDA)")]
Dataset = Annotated[
    str,
    typer.Option(
        help="a timm dataset name, e.g. torch/cifar10, read from --data (its root; no download)"
    ),
]


@app.command()
@handle_errors
def run(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. resnet18")],
    data: Data = None,
    dataset: Dataset = "",
    space: Annotated[str, typer.Option(help="shipped space name or YAML file")] = "default",
    storage: Storage = None,
    study_name: NewStudyName = None,
    n_trials: Annotated[int | None, typer.Option(help="trials to run in this call")] = 20,
    timeout: Annotated[float | None, typer.Option(help="stop starting trials after (s)")] = None,
    epochs: Annotated[int, typer.Option(help="proxy epochs per trial")] = 2,
    batches_per_epoch: BatchesPerEpoch = None,
    img_size: ImgSize = 32,
    batch_size: BatchSize = 64,
    train_fraction: Annotated[float, typer.Option(help="share of the training set")] = 1.0,
    val_fraction: Annotated[float, typer.Option(help="share of the validation set")] = 1.0,
    objectives: Annotated[
        str, typer.Option(help="top1, or top1 plus macs/params/latency (comma list)")
    ] = "top1",
    max_params: Annotated[float | None, typer.Option(help="budget: parameters")] = None,
    max_macs: Annotated[float | None, typer.Option(help="budget: MACs at the proxy size")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="budget: batch-1 ms")] = None,
    pruner: Annotated[
        str, typer.Option(help="auto (Hyperband for top1 alone), hyperband, or none")
    ] = "auto",
    checkpoint: Checkpoint = None,
    device: Device = "cpu",
    seed: Seed = 0,
    output: Annotated[Path | None, typer.Option(help="run directory")] = None,
    workers: Workers = None,
    gpus: Gpus = None,
    gpus_per_trial: GpusPerTrial = 1,
    sync_bn: SyncBN = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Run (or resume) a search on MODEL; the embedded Animal-MNIST data by default."""
    from an_search.search import SearchConfig, run_search
    from an_search.train import TrainConfig

    train = TrainConfig(
        epochs=epochs,
        batches_per_epoch=batches_per_epoch,
        img_size=img_size,
        batch_size=batch_size,
        train_fraction=train_fraction,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    cfg = SearchConfig(
        model=model,
        data=data,
        space=space,
        output_dir=output,
        storage=storage,
        study_name=study_name,
        n_trials=n_trials,
        timeout=timeout,
        objectives=objectives,
        max_params=max_params,
        max_macs=max_macs,
        max_latency_ms=max_latency_ms,
        seed=seed,
        train=train,
        checkpoint=checkpoint,
        dataset=dataset,
        pruner=pruner,
    )
    from ._progress import TrialProgress

    err = stderr()
    kept = "finished trials are kept: the same command continues the study (adding --n-trials)"
    with (
        on_interrupt(kept, debug),
        TrialProgress(err, total=n_trials, enabled=not quiet and not json_out) as bar,
    ):
        if workers is None and gpus is None and gpus_per_trial == 1 and not sync_bn:
            study = run_search(
                cfg, callbacks=[bar.on_trial], on_message=err.print, progress=bar.on_step
            )
        else:
            study = _run_workers(cfg, bar, workers, gpus, gpus_per_trial, sync_bn)
    from an_search.search import load_space

    run_dir = cfg.run_dir(load_space(space).name)
    where = str(run_dir)
    if storage is not None or os.environ.get("OPTUNA_STORAGE"):  # (not the run directory's)
        from an_search.search.storage import hide_password, resolve_storage_url

        url = hide_password(resolve_storage_url(storage, run_dir))
        where = f"--storage {shlex.quote(url)} --study-name {shlex.quote(study.study_name)}"
    with on_interrupt(f"the study is done; write its report with: an-search report {where}", debug):
        _emit_report(study, run_dir, json_out)


@app.command()
@handle_errors
def report(
    run_dir: RunDir = None,
    storage: Storage = None,
    study_name: StudyName = None,
    output: Annotated[Path | None, typer.Option(help="where CSV/JSON/PNGs go")] = None,
    top: Annotated[
        int,
        typer.Option(
            min=0, help="table rows: the baselines and the N best by top-1 (0: every trial)"
        ),
    ] = TOP,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Tables of the trials (the best; --top 0: all) and the Pareto front; CSV, JSON, PNGs."""
    study, url, where = _open(run_dir, storage, study_name)
    _emit_report(study, output or where, json_out, storage_url=url, top=top)


def _emit_report(
    study: optuna.Study,
    out_dir: Path,
    json_out: bool,
    storage_url: str | None = None,
    top: int = TOP,
) -> None:
    """Write CSV/JSON/PNGs into ``out_dir``; print the tables (or JSON) and where files went."""
    from an_search.search import dashboard_command, study_table, write_report

    rows = study_table(study)
    files = write_report(study, out_dir)
    if json_out:
        print_json({"study": study.study_name, "trials": rows, "files": files})
        return
    _render_rows(study, rows, top)
    err = stderr()
    err.print(f"written: {', '.join(str(p) for p in files.values())}")
    if storage_url is not None:
        command = dashboard_command(storage_url)
        hidden = " (the password is shown as ***: type it there)" if ":***@" in command else ""
        err.print(f"dashboard: {command}{hidden}")


@app.command()
@handle_errors
def export(
    run_dir: RunDir = None,
    storage: Storage = None,
    study_name: StudyName = None,
    top: Annotated[int, typer.Option(help="how many winners")] = 3,
    output: Annotated[Path | None, typer.Option(help="directory for the recipes")] = None,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Write the best configurations as an-convert recipes (recipe.json each)."""
    from an_search.search import export_top

    if top < 1:
        raise fail(f"--top must be at least 1, got {top}")
    study, _, where = _open(run_dir, storage, study_name)
    dirs = export_top(study, top, output or (where / "export"))
    if not dirs:
        raise fail(
            f"study {study.study_name!r} has no finished, feasible trial with AN to export yet"
        )
    if len(dirs) < top:
        stderr().print(
            f"note: {len(dirs)} of the {top} asked for: the study has no more finished, "
            "feasible trials with AN (the unconverted baseline, duplicates and over-budget "
            "trials are left out; the paper placement is one of them)",
            highlight=False,
            soft_wrap=True,
        )
    if json_out:
        print_json({"exported": [str(d) for d in dirs]})
        return
    for d in dirs:
        stdout().print(str(d / "recipe.json"))


@app.command()
@handle_errors
def worker(
    storage: Annotated[str, typer.Option(help="the study's storage, e.g. postgresql://...")],
    study_name: StudyName = None,
    workers: Workers = None,
    gpus: Gpus = None,
    gpus_per_trial: GpusPerTrial = 1,
    sync_bn: SyncBN = False,
    n_trials: Annotated[
        int | None, typer.Option(help="trials this machine adds (default: up to the study's total)")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="stop starting trials after (s)")] = None,
    data: Annotated[str | None, typer.Option(help="the dataset's path on this machine")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="the study's starting weights' path on this machine")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: the study's)")] = None,
    output: Annotated[Path | None, typer.Option(help="local run directory")] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Join a running study from this machine (its settings are read from the study)."""
    from an_search.search import join_config

    from ._progress import TrialProgress

    cfg = join_config(
        storage,
        study_name,
        data=data,
        device=device,
        output_dir=output,
        n_trials=n_trials,
        timeout=timeout,
        checkpoint=checkpoint,
    )
    err = stderr()
    with (
        on_interrupt("finished trials are kept: re-run the worker to go on", debug),
        TrialProgress(err, total=None, enabled=not quiet) as bar,
    ):
        study = _run_workers(cfg, bar, workers, gpus, gpus_per_trial, sync_bn, join=True)
    err.print(f"study {study.study_name}: {len(study.trials)} trials; this machine is done")


def _run_workers(
    cfg: Any,
    bar: Any,
    workers: int | None,
    gpus: str | None,
    gpus_per_trial: int,
    sync_bn: bool,
    *,
    join: bool = False,
) -> optuna.Study:
    from an_search.errors import TrainConfigError
    from an_search.search import run_workers

    ids = None
    if gpus is not None:
        try:
            ids = [int(g) for g in split_list(gpus) or []]
        except ValueError:
            raise TrainConfigError(f"--gpus takes GPU ids, e.g. 0,1,2,3: {gpus!r}") from None
    err = stderr()
    return run_workers(
        cfg,
        workers,
        gpus=ids,
        gpus_per_trial=gpus_per_trial,
        sync_bn=sync_bn,
        join=join,
        on_trial=bar.on_trial,
        on_message=err.print,
    )


@app.command()
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
    for col in ("run", "M params", "top1", "top5", "wall s", "saved to"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["run"], f"{r['params'] / 1e6:.3f}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
            f"{r['wall_s']:.0f}", str(r["model_dir"]),
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

    study_file = source is not None and source.suffix in _STUDY_FILES and source.is_file()
    if (
        source is not None
        and not study_file
        and (source.is_file() or (source / RECIPE_FILE).is_file())
    ):
        file = source if source.is_file() else source / RECIPE_FILE
        recipe = read_recipe(file)
        if storage is not None:  # the study it came from
            study = _open(None, storage, study_name)[0]
        else:
            study = _exported_from(file.parent, study_name, say)
        searched = None if study is None else study.user_attrs.get("model")
        if searched is not None and searched != recipe.model:
            raise StorageError(
                f"study {study.study_name!r} searched {searched}, the recipe converts "
                f"{recipe.model}: give the --storage and --study-name of the study it came from"
            )
        return recipe, file.parent, study, None
    study, _, where = _open(source, storage, study_name)
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


#: A run directory's study file given in its place (SQLite, or the workers' journal).
_STUDY_FILES = (".db", ".log", ".sqlite", ".sqlite3")


def _open(
    run_dir: Path | None, storage: str | None, study_name: str | None
) -> tuple[optuna.Study, str, Path]:
    import os

    from an_search.errors import StorageError
    from an_search.search import open_study, study_storage_url
    from an_search.search.config import default_run_dir

    source = storage or (str(run_dir) if run_dir is not None else os.environ.get("OPTUNA_STORAGE"))
    if source is None:
        raise StorageError("no study given: pass a run directory or --storage URL")
    if storage is None and run_dir is not None and not run_dir.exists():
        raise StorageError(
            f"no run directory {str(run_dir)!r}: pass the --output of an an-search run "
            "(an-runs/MODEL-SPACE by default, with -OBJECTIVES for several) or --storage"
        )
    study = open_study(source, study_name)
    where = run_dir if run_dir is not None else default_run_dir(study.study_name)
    if storage is None and run_dir is not None and run_dir.is_file():  # RUN/study.db given
        where = run_dir.parent
    return study, study_storage_url(source), where


GMACS = ".5g"  # significant digits: a 32 px proxy's 0.022557 and 0.022598 stay apart


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def _shown(rows: list[dict[str, Any]], top: int) -> tuple[list[dict[str, Any]], str | None]:
    """The rows the table shows: all (a study of at most ``top`` trials besides its baselines),
    or the baselines and the ``top`` best distinct configurations by top-1, in trial order;
    with a caption saying what was left out."""
    baselines = {r["number"] for r in rows if r["baseline"]}
    best = sorted(  # (the baselines are shown besides the top: not among them)
        (
            r
            for r in rows
            if r["top1"] is not None and r["duplicate_of"] is None and not r["baseline"]
        ),
        key=lambda r: (-r["top1"], r["number"]),
    )
    if not top or len(rows) <= len(baselines) + top:  # (no shorter than all of them)
        return rows, None
    keep = baselines | {r["number"] for r in best[:top]}
    states = Counter("INFEASIBLE" if r["infeasible"] else r["state"] for r in rows)
    counts = ", ".join(f"{n:,} {state.lower()}" for state, n in states.most_common())
    return [r for r in rows if r["number"] in keep], (
        f"the baselines and the {top} best by top-1 of {len(rows):,} trials ({counts}); "
        "`an-search report --top 0` shows all, trials.csv holds every one"
    )


def _render_rows(study: optuna.Study, rows: list[dict[str, Any]], top: int = TOP) -> None:
    from rich.table import Table

    from an_search.search import FRONT_COSTS, front_cost, pareto_front

    out = stdout()
    shown, caption = _shown(rows, top)
    table = Table(title=f"study {study.study_name}: {len(rows)} trials", caption=caption)
    for col in ("#", "configuration", "M params", "GMACs", "top1", "vs base", "vs paper", "state"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in shown:
        state = "INFEASIBLE" if r["infeasible"] else r["state"]
        if r["duplicate_of"] is not None:
            state += f" (=#{r['duplicate_of']})"
        if r["state"] == "RUNNING" and r["reason"]:
            state += " (worker gone)"
        table.add_row(
            str(r["number"]),
            r["configuration"],
            _fmt(r["params"] and r["params"] / 1e6, ".3f"),
            _fmt(r["gmacs"], GMACS),
            _fmt(r["top1"] if r["top1"] is not None else r["last_top1"], ".2f"),
            _fmt(r["delta_bn"], "+.2f"),
            _fmt(r["delta_paper"], "+.2f"),
            state,
        )
    out.print(table)
    cost = front_cost(study)
    key, column = FRONT_COSTS[cost][0], {"macs": "GMACs", "params": "params"}.get(cost, "ms")
    front = pareto_front(rows, cost=key)
    pt = Table(title=f"Pareto front (top1 vs {column if cost != 'latency' else 'latency'})")
    for col in ("#", "configuration", column, "top1"):
        pt.add_column(col)
    spec = {"gmacs": GMACS, "params": ",", "latency_ms": ".2f"}[key]
    for r in front:
        pt.add_row(str(r["number"]), r["configuration"], _fmt(r[key], spec), _fmt(r["top1"], ".2f"))
    out.print(pt)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
