"""``an-search``: Optuna study over AN placement, K and head; reports, exports, retraining."""

from __future__ import annotations

import os
import shlex
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
from ._options import (
    BatchesPerEpoch,
    BatchSize,
    Checkpoint,
    Data,
    Dataset,
    Device,
    Gpus,
    GpusPerTrial,
    ImgSize,
    NewStudyName,
    RunDir,
    Seed,
    Storage,
    StudyName,
    SyncBN,
    Workers,
)
from ._retrain import retrain
from ._study import open_run
from ._tables import TOP, render_rows

if TYPE_CHECKING:
    import optuna

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    cls=Group,
    help="Search where and how to use Attentive Normalization in a timm model (Optuna).",
)


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
    study, url, where = open_run(run_dir, storage, study_name)
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
    render_rows(study, rows, top)
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
    study, _, where = open_run(run_dir, storage, study_name)
    dirs = export_top(study, top, output or (where / "export"))
    if not dirs:
        raise fail(
            f"study {study.study_name!r} has no finished, feasible trial with AN to export yet"
        )
    if len(dirs) < top:
        papers = {  # (the paper placement's, when it ranks: said, as it is not searched)
            t.number
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("baseline") == "paper"
        }
        paper = [d.name for d in dirs if int(d.name.rpartition("_trial")[2]) in papers]
        stderr().print(
            f"note: {len(dirs)} of the {top} asked for: the study has no more finished, "
            "feasible trials with AN (the unconverted baseline, duplicates and over-budget "
            "trials are left out)"
            + (f"; {paper[0]} is the paper placement's baseline trial" if paper else ""),
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


app.command()(retrain)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
