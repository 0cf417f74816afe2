"""Report data of a study: one row per trial, the Pareto front, CSV/JSON/PNG files, exports.

Rows are plain dicts (the CLI renders them with rich, ``--json`` dumps them). Columns:
number, state, baseline, configuration (one line), params, gmacs, latency_ms, top1 (final
validation top-1 % of a COMPLETE feasible trial, else None), last_top1 (last epoch reached, also
for pruned trials), epochs, delta_bn / delta_paper (top1 minus the baseline's), infeasible,
over_budget, duplicate_of, reason (why pruned or failed; of a RUNNING trial, that its worker
is gone), n_sites, steps, wall_s, config_key, config. Every file is written atomically
(temporary file, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from an_search._values import is_integer
from an_search.errors import OutputDirError, RecipeError, TrainConfigError
from an_search.rewrite import RECIPE_FILE, Recipe, read_recipe

from ._files import atomic_write, make_dir
from .storage import heartbeat_enabled, hide_password, with_driver, worker_gone

__all__ = [
    "dashboard_command",
    "export_top",
    "FRONT_COSTS",
    "check_report_dir",
    "front_cost",
    "pareto_front",
    "ranked_trials",
    "study_table",
    "write_csv",
    "write_json",
    "write_report",
]

_CSV_COLUMNS = (
    "number", "state", "baseline", "configuration", "params", "gmacs", "latency_ms", "top1",
    "last_top1", "epochs", "delta_bn", "delta_paper", "infeasible", "over_budget",
    "duplicate_of", "reason", "n_sites", "steps", "wall_s", "config_key",
)  # fmt: skip


def study_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial, in trial order (columns in the module docstring)."""
    trials = study.get_trials(deepcopy=False)
    rows = [_row(t) for t in trials]
    retries = {failed: t.number for t in trials if (failed := _retried(t)) is not None}
    for row, trial in zip(rows, trials, strict=True):
        if row["state"] == TrialState.FAIL.name:
            row["reason"] = _fail_reason(row["reason"], retries.get(row["number"]))
        elif row["state"] == TrialState.RUNNING.name and (gone := worker_gone(trial)):
            row["reason"] = f"{gone}: {_next(study, trial)}"
    for name in ("bn", "paper"):
        ref = _baseline_top1(rows, name)
        for row in rows:
            top1 = row["top1"]
            row[f"delta_{name}"] = None if top1 is None or ref is None else top1 - ref
    return rows


#: Cost objective -> (its row key, axis label), for the front and its plot.
FRONT_COSTS: dict[str, tuple[str, str]] = {
    "macs": ("gmacs", "GMACs (multiply-adds, 1e9)"),
    "params": ("params", "parameters"),
    "latency": ("latency_ms", "batch-1 latency (ms)"),
}


def front_cost(study: optuna.Study) -> str:
    """The cost a report's front sets against top-1: the study's first cost objective (GMACs
    when it optimises top-1 alone)."""
    objectives = study.user_attrs.get("objectives") or ["top1"]
    return objectives[1] if len(objectives) > 1 and objectives[1] in FRONT_COSTS else "macs"


def pareto_front(rows: list[dict[str, Any]], *, cost: str = "gmacs") -> list[dict[str, Any]]:
    """Rows no other row beats on both top-1 (higher) and ``cost`` (lower), by cost ascending.

    Only COMPLETE, feasible, non-duplicate trials with a top-1 take part.
    """
    pts = [
        r
        for r in rows
        if r["top1"] is not None and r.get(cost) is not None and r["duplicate_of"] is None
    ]

    def beaten(r: dict[str, Any]) -> bool:
        return any(
            o["top1"] >= r["top1"]
            and o[cost] <= r[cost]
            and (o["top1"] > r["top1"] or o[cost] < r[cost])
            for o in pts
        )

    return sorted((r for r in pts if not beaten(r)), key=lambda r: (r[cost], -r["top1"]))


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write the table columns of ``rows`` as CSV (atomic)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in _CSV_COLUMNS})
    return atomic_write(Path(path), buf.getvalue())


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON (atomic)."""
    return atomic_write(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def write_report(study: optuna.Study, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``trials.csv``, ``report.json``, ``pareto.png`` and ``history.png`` into ``out_dir``.

    Returns:
        File kind (csv, json, pareto, history) -> path.

    Raises:
        OutputDirError: the directory cannot be created or written.
    """
    from .plots import plot_history, plot_pareto

    check_report_dir(out_dir, study.study_name)
    out = make_dir(Path(out_dir))
    rows = study_table(study)
    key, label = FRONT_COSTS[front_cost(study)]
    front = pareto_front(rows, cost=key)
    summary = {
        "study": study.study_name,
        "model": study.user_attrs.get("model"),
        "objectives": study.user_attrs.get("objectives"),
        "metric_names": study.metric_names,
        "baselines": {r["baseline"]: r for r in rows if r["baseline"] and r["top1"] is not None},
        "states": _count_states(rows),
        "pareto": [r["number"] for r in front],
        "pareto_cost": key,
        "trials": rows,
    }
    return {
        "csv": write_csv(rows, out / "trials.csv"),
        "json": write_json(summary, out / "report.json"),
        "pareto": plot_pareto(
            rows, front, out / "pareto.png", title=study.study_name, cost=key, label=label
        ),
        "history": plot_history(rows, out / "history.png", title=study.study_name),
    }


#: What an export wrote, and for which study (``export_top``).
EXPORT_FILE = "export.json"


def check_report_dir(out_dir: str | os.PathLike[str], study_name: str) -> None:
    """Refuse a folder whose ``report.json`` is another study's (its files would be replaced).

    Raises:
        OutputDirError: naming the other study and the way out.
    """
    path = Path(out_dir) / "report.json"
    try:
        other = json.loads(path.read_text()).get("study")
    except (OSError, ValueError, AttributeError):
        return  # no report there (or not ours to read): nothing to protect
    if isinstance(other, str) and other != study_name:
        raise OutputDirError(
            f"{str(out_dir)!r} holds the report of study {other!r}: give study "
            f"{study_name!r} its own folder (--output)"
        )


def dashboard_command(storage_url: str) -> str:
    """The shell command that opens the study in optuna-dashboard: the URL with the database
    driver an-search opens it with (``postgresql+psycopg2://`` when that is the installed one),
    and a server password shown as ``***`` (to type in)."""
    return f"optuna-dashboard {shlex.quote(hide_password(with_driver(storage_url)))}"


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's AN configurations, best first: what ``export_top`` writes, in its order.

    Ranked by top-1 (several objectives: Pareto-optimal trials first); only COMPLETE, feasible
    trials whose model has AN, one per distinct model (its first trial).
    """
    rows = [r for r in study_table(study) if r["top1"] is not None and r["n_sites"]]
    pareto = {t.number for t in study.best_trials} if len(study.directions) > 1 else set()
    rows.sort(  # (a trial added by hand may lack its cost: last among equals)
        key=lambda r: (
            r["number"] not in pareto,
            -r["top1"],
            math.inf if r["gmacs"] is None else r["gmacs"],
            r["number"],
        )
    )
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    ranked, seen = [], set()
    for row in rows:
        trial = trials[row["number"]]
        if row["config_key"] not in seen and isinstance(trial.user_attrs.get("recipe"), dict):
            seen.add(row["config_key"])  # (one added by hand without its recipe: not exportable)
            ranked.append(trial)
    return ranked


def export_top(study: optuna.Study, n: int, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the ``n`` best configurations as recipes: ``out_dir/rank{i}_trial{n}/recipe.json``.

    The order of :func:`ranked_trials`. Each file is an an-convert recipe
    (``an_search.rewrite.Recipe``): ``an_search.rewrite.build_from_recipe`` rebuilds the model.
    ``out_dir/export.json`` names the study and the folders written: the folders of this study's
    earlier export that this one does not write again are removed when they hold nothing but
    their recipe, unchanged (a retrain inside one keeps it). Nothing else is removed, and no
    recipe that is not this study's trial's is replaced.

    Returns:
        The directories written, best first.

    Raises:
        TrainConfigError: ``n`` is not an integer of 0 or more.
        OutputDirError: the folder holds another study's export, or a folder to write holds a
            recipe that is not its trial's in this study.
    """
    if not is_integer(n) or n < 0:
        raise TrainConfigError(f"top must be an integer, 0 or more, got {n!r}")
    out = Path(out_dir)
    trials = study.get_trials(deepcopy=False)
    started = _first_start(trials)
    previous = _previous_export(out, study.study_name, started)
    chosen = [
        (out / f"rank{rank}_trial{trial.number}", trial)
        for rank, trial in enumerate(ranked_trials(study)[:n], start=1)
    ]
    for target, trial in chosen:  # (all checked before any is written)
        if (target / RECIPE_FILE).exists() and not _holds_recipe_of(target, trial):
            raise OutputDirError(
                f"{str(target)!r} holds a recipe that is not trial {trial.number}'s of study "
                f"{study.study_name!r} (another study's export, or edited): export into another "
                "folder (--output)"
            )
    written = []
    for target, trial in chosen:
        recipe = Recipe.from_dict(trial.user_attrs["recipe"])
        atomic_write(make_dir(target) / RECIPE_FILE, recipe.to_json())
        written.append(target)
    by_number = {t.number: t for t in trials}
    for name in previous:
        old, match = out / name, re.fullmatch(r"rank\d+_trial(\d+)", name)
        if match is None or old in written or not old.is_dir():
            continue
        trial = by_number.get(int(match.group(1)))
        if [p.name for p in old.iterdir()] == [RECIPE_FILE] and _holds_recipe_of(old, trial):
            (old / RECIPE_FILE).unlink()
            old.rmdir()
    folders = [d.name for d in written]
    make_dir(out)
    mark = {"study": study.study_name, "started": started, "folders": folders}
    atomic_write(out / EXPORT_FILE, json.dumps(mark))
    return written


def _first_start(trials: list[FrozenTrial]) -> str | None:
    """When a study's first trial started (``trials``: the study's, in number order): with its
    name, what tells it from another study of that name (a run directory whose study was
    deleted and run again, another storage)."""
    for trial in trials:
        if trial.datetime_start is not None:
            return trial.datetime_start.isoformat()
    return None


def _previous_export(out: Path, study_name: str, started: str | None) -> list[str]:
    """The folders this study's earlier export in ``out`` wrote (every rank folder there, for
    an export from before ``export.json``: each is removed only if it holds its trial's recipe);
    OutputDirError when ``out`` holds another study's export."""
    try:
        data = json.loads((out / EXPORT_FILE).read_text())
    except FileNotFoundError:
        return [p.name for p in out.glob("rank*_trial*")] if out.is_dir() else []
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    other, when = data.get("study"), data.get("started")
    if isinstance(other, str) and other != study_name:
        raise OutputDirError(
            f"{str(out)!r} holds the export of study {other!r}: give study {study_name!r} "
            "its own folder (--output)"
        )
    if isinstance(when, str) and started is not None and when != started:
        raise OutputDirError(
            f"{str(out)!r} holds the export of another study named {study_name!r} (its first "
            f"trial started {when}, this one's {started}): export into another folder "
            "(--output), or remove that one"
        )
    folders = data.get("folders")
    return [f for f in folders if isinstance(f, str)] if isinstance(folders, list) else []


def _holds_recipe_of(folder: Path, trial: FrozenTrial | None) -> bool:
    """Whether ``folder``'s recipe is the one ``trial`` recorded (an export of it)."""
    if trial is None or "recipe" not in trial.user_attrs:
        return False
    try:
        held = read_recipe(folder)
    except RecipeError:  # (unreadable, or no recipe: not ours to judge)
        return False
    return held.to_json() == Recipe.from_dict(trial.user_attrs["recipe"]).to_json()


def _row(t: FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    history = a.get("history") or []
    over = a.get("infeasible") or []
    complete = t.state == TrialState.COMPLETE and not over
    return {
        "number": t.number,
        "state": t.state.name,
        "baseline": a.get("baseline"),
        "configuration": _describe(t),
        "params": a.get("params"),
        "gmacs": a["macs"] / 1e9 if a.get("macs") is not None else None,
        "latency_ms": a.get("latency_ms"),
        "top1": t.values[0] if complete and t.values else None,
        "last_top1": history[-1]["top1"] if history else None,
        "epochs": len(history),
        "infeasible": bool(over),
        "over_budget": over,
        "duplicate_of": a.get("duplicate_of"),
        "reason": a.get("prune_reason") or a.get("fail_reason"),
        "n_sites": a.get("n_sites"),
        "steps": a.get("steps"),
        "wall_s": a.get("wall_s"),
        "config_key": a.get("config_key"),
        "config": a.get("config"),
    }


def _retried(t: FrozenTrial) -> int | None:
    """The failed trial that ``t`` re-queues: named by Optuna's retry callback, or by the
    search's re-queue of a baseline that did not finish; else None."""
    for number in (t.system_attrs.get("failed_trial"), t.user_attrs.get("requeued_from")):
        if is_integer(number):
            return number
    return None


def _next(study: optuna.Study, trial: FrozenTrial) -> str:
    """What the next process on the study does with a RUNNING trial whose worker is gone."""
    if trial.user_attrs.get("baseline"):
        return "the next run or worker on the study fails it and queues the baseline again"
    if heartbeat_enabled(study):
        return "the next run or worker on the study fails and re-queues it"
    return (
        "the next run or worker on the study fails it (trials are re-queued on a server "
        "database only)"
    )


def _fail_reason(reason: str | None, retry: int | None) -> str:
    """A failed trial's reason; Optuna's heartbeat fails a trial without one."""
    text = reason or "no reason recorded: its worker was killed or its heartbeat went stale"
    return text if retry is None else f"{text}; retried as trial {retry}"


def _describe(t: FrozenTrial) -> str:
    """One line: baseline name, or placement / per-stage roles, K, head, pool."""
    baseline = t.user_attrs.get("baseline")
    if baseline is not None:
        return {"bn": "unconverted baseline (no AN)", "paper": "paper placement"}.get(
            baseline, baseline
        )
    config = t.user_attrs.get("config")
    if not config:
        return "?"  # the trial stopped before it chose a configuration
    roles = [
        t.params[f"stage{i}_role"] for i in range(len(t.params)) if f"stage{i}_role" in t.params
    ]
    if not config.get("include") and config.get("placement") == "none":
        return "no AN (" + ("per-stage " + "/".join(roles) if roles else "none") + ")"
    where = "per-stage " + "/".join(roles) if roles else str(config.get("placement"))
    k = config.get("k")
    k_text = "paper" if k is None else (",".join(map(str, k)) if isinstance(k, list) else str(k))
    parts = [where, f"K={k_text}", config.get("head", "default"), config.get("pool", "meanstd")]
    if config.get("norm_types"):
        parts.append("base=" + ",".join(config["norm_types"]))
    return " ".join(parts)


def _baseline_top1(rows: list[dict[str, Any]], name: str) -> float | None:
    done = [r for r in rows if r["baseline"] == name and r["top1"] is not None]
    return done[-1]["top1"] if done else None


def _count_states(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        state = "INFEASIBLE" if r["infeasible"] else r["state"]
        counts[state] = counts.get(state, 0) + 1
    return counts


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(float(value))  # (the shortest text that reads back as the same float)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value
