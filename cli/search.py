"""``an-search``: Optuna study over AN placement, K and head; reports, exports, retraining."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ._common import Debug, JsonOut, Quiet, handle_errors, print_json, split_list, stderr, stdout

if TYPE_CHECKING:
    import optuna

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Search where and how to use Attentive Normalization in a timm model (Optuna).",
)

Storage = Annotated[
    Optional[str],
    typer.Option(help="Optuna storage URL, journal file (.log) or SQLite file; $OPTUNA_STORAGE"),
]
StudyName = Annotated[Optional[str], typer.Option(help="study name (default: MODEL-SPACE)")]
RunDir = Annotated[
    Optional[Path], typer.Argument(help="run directory of an earlier `an-search run`")
]


@app.command()
@handle_errors
def run(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. resnet18")],
    data: Annotated[
        Optional[str], typer.Option(help="image folder (ImageNet layout) or timm dataset root")
    ] = None,
    space: Annotated[str, typer.Option(help="shipped space name or YAML file")] = "default",
    storage: Storage = None,
    study_name: StudyName = None,
    n_trials: Annotated[Optional[int], typer.Option(help="trials to run in this call")] = 20,
    timeout: Annotated[Optional[float], typer.Option(help="stop starting trials after (s)")] = None,
    epochs: Annotated[int, typer.Option(help="proxy epochs per trial")] = 2,
    batches_per_epoch: Annotated[Optional[int], typer.Option(help="cap updates/epoch")] = None,
    img_size: Annotated[int, typer.Option(help="proxy training image size")] = 32,
    batch_size: Annotated[int, typer.Option(help="images per update")] = 64,
    train_fraction: Annotated[float, typer.Option(help="share of the training set")] = 1.0,
    objectives: Annotated[
        str, typer.Option(help="top1, or top1 plus macs/params/latency (comma list)")
    ] = "top1",
    max_params: Annotated[Optional[int], typer.Option(help="budget: parameters")] = None,
    max_macs: Annotated[Optional[float], typer.Option(help="budget: MACs at the proxy size")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option(help="budget: batch-1 ms")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="local weights to start from")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N")] = "cpu",
    seed: Annotated[int, typer.Option(help="sampler and training seed")] = 0,
    output: Annotated[Optional[Path], typer.Option(help="run directory")] = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Run (or resume) a search on MODEL; the embedded Animal-MNIST data by default."""
    from an_search.search import SearchConfig, run_search, study_table, write_report
    from an_search.train import TrainConfig

    train = TrainConfig(
        epochs=epochs,
        batches_per_epoch=batches_per_epoch,
        img_size=img_size,
        batch_size=batch_size,
        train_fraction=train_fraction,
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
        max_macs=int(max_macs) if max_macs is not None else None,
        max_latency_ms=max_latency_ms,
        seed=seed,
        train=train,
        checkpoint=checkpoint,
    )
    from ._progress import TrialProgress

    err = stderr()
    with TrialProgress(err, total=n_trials, enabled=not quiet and not json_out) as bar:
        study = run_search(cfg, callbacks=[bar.on_trial], on_message=lambda m: err.print(m))
    rows = study_table(study)
    from an_search.search import load_space

    files = write_report(study, cfg.run_dir(load_space(space).name))
    if json_out:
        print_json({"study": study.study_name, "trials": rows, "files": files})
        return
    _render_rows(study, rows)
    err.print(f"report written to {files['json'].parent}/ (trials.csv, report.json, PNGs)")


@app.command()
@handle_errors
def report(
    run_dir: RunDir = None,
    storage: Storage = None,
    study_name: StudyName = None,
    output: Annotated[Optional[Path], typer.Option(help="where CSV/JSON/PNGs go")] = None,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Tables of every trial and the Pareto front; CSV, JSON and PNG plots."""
    from an_search.search import dashboard_command, study_table, write_report

    study, url, where = _open(run_dir, storage, study_name)
    rows = study_table(study)
    files = write_report(study, output or where)
    if json_out:
        print_json({"study": study.study_name, "trials": rows, "files": files})
        return
    _render_rows(study, rows)
    err = stderr()
    err.print(f"written: {', '.join(str(p) for p in files.values())}")
    err.print(f"dashboard: {dashboard_command(url)}")


@app.command()
@handle_errors
def export(
    run_dir: RunDir = None,
    storage: Storage = None,
    study_name: StudyName = None,
    top: Annotated[int, typer.Option(help="how many winners")] = 3,
    output: Annotated[Optional[Path], typer.Option(help="directory for the recipes")] = None,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Write the best configurations as an-convert recipes (recipe.json each)."""
    from an_search.search import export_top

    study, _, where = _open(run_dir, storage, study_name)
    dirs = export_top(study, top, output or (where / "export"))
    if json_out:
        print_json({"exported": [str(d) for d in dirs]})
        return
    for d in dirs:
        stdout().print(str(d / "recipe.json"))


def _open(
    run_dir: Path | None, storage: str | None, study_name: str | None
) -> tuple[optuna.Study, str, Path]:
    import os

    from an_search.errors import StorageError
    from an_search.search import open_study, resolve_storage_url

    source = storage or (str(run_dir) if run_dir is not None else os.environ.get("OPTUNA_STORAGE"))
    if source is None:
        raise StorageError("no study given: pass a run directory or --storage URL")
    study = open_study(source, study_name)
    if run_dir is not None:
        where = run_dir
        url = resolve_storage_url(str(run_dir / "study.db"), run_dir)
    else:
        where = Path("an-runs") / study.study_name
        url = resolve_storage_url(source, where)
    return study, url, where


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def _render_rows(study: optuna.Study, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from an_search.search import pareto_front

    out = stdout()
    table = Table(title=f"study {study.study_name}: {len(rows)} trials")
    for col in ("#", "configuration", "M params", "GMACs", "top1", "vs BN", "vs paper", "state"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in rows:
        state = "INFEASIBLE" if r["infeasible"] else r["state"]
        if r["duplicate_of"] is not None:
            state += f" (=#{r['duplicate_of']})"
        table.add_row(
            str(r["number"]),
            r["configuration"],
            _fmt(r["params"] and r["params"] / 1e6, ".3f"),
            _fmt(r["gmacs"], ".4f"),
            _fmt(r["top1"] if r["top1"] is not None else r["last_top1"], ".2f"),
            _fmt(r["delta_bn"], "+.2f"),
            _fmt(r["delta_paper"], "+.2f"),
            state,
        )
    out.print(table)
    front = pareto_front(rows)
    pt = Table(title="Pareto front (top1 vs GMACs)")
    for col in ("#", "configuration", "GMACs", "top1"):
        pt.add_column(col)
    for r in front:
        pt.add_row(str(r["number"]), r["configuration"], _fmt(r["gmacs"], ".4f"), _fmt(r["top1"], ".2f"))
    out.print(pt)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
