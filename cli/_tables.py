"""The study tables ``an-search run`` and ``report`` print: the trials, and the Pareto front."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from ._common import stdout

if TYPE_CHECKING:
    import optuna

TRIAL_COLUMNS = ("#", "configuration", "M params", "GMACs", "top1", "vs base", "vs paper", "state")
_WHOLE = ("M params", "GMACs", "params", "ms", "top1")  # never cut: costs, accuracy
TOP = 20  # table rows of a report besides the baselines (report --top)
#: significant digits of GMACs and M params: configurations a K apart at one site (a few
#: hundred parameters, a few thousand MACs in ResNet-50's 25.8 M and 4.1 G) stay apart
GMACS = MPARAMS = ".7g"


def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def shown(rows: list[dict[str, Any]], top: int) -> tuple[list[dict[str, Any]], str | None]:
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


def render_rows(study: optuna.Study, rows: list[dict[str, Any]], top: int = TOP) -> None:
    from rich.table import Table

    from an_search.search import FRONT_COSTS, front_cost, pareto_front

    out = stdout()
    picked, caption = shown(rows, top)
    table = Table(title=f"study {study.study_name}: {len(rows)} trials", caption=caption)
    cells = []
    for r in picked:
        state = "INFEASIBLE" if r["infeasible"] else r["state"]
        if r["duplicate_of"] is not None:
            state += f" (=#{r['duplicate_of']})"
        if r["state"] == "RUNNING" and r["reason"]:
            state += " (worker gone)"
        cells.append(
            (
                str(r["number"]),
                r["configuration"],
                fmt(r["params"] and r["params"] / 1e6, MPARAMS),
                fmt(r["gmacs"], GMACS),
                fmt(r["top1"] if r["top1"] is not None else r["last_top1"], ".2f"),
                fmt(r["delta_bn"], "+.2f"),
                fmt(r["delta_paper"], "+.2f"),
                state,
            )
        )
    _columns(table, TRIAL_COLUMNS, cells)
    for row in cells:
        table.add_row(*row)
    out.print(table)
    cost = front_cost(study)
    key, column = FRONT_COSTS[cost][0], {"macs": "GMACs", "params": "params"}.get(cost, "ms")
    front = pareto_front(rows, cost=key)
    pt = Table(title=f"Pareto front (top1 vs {column if cost != 'latency' else 'latency'})")
    spec = {"gmacs": GMACS, "params": ",", "latency_ms": ".2f"}[key]
    cells = [
        (str(r["number"]), r["configuration"], fmt(r[key], spec), fmt(r["top1"], ".2f"))
        for r in front
    ]
    _columns(pt, ("#", "configuration", column, "top1"), cells, justify="left")
    for row in cells:
        pt.add_row(*row)
    out.print(pt)


def _columns(
    table: Any, names: tuple[str, ...], cells: list[tuple[str, ...]], justify: str = "right"
) -> None:
    """The columns; the costs' and top-1's as wide as their widest cell, never cut (a narrow
    terminal wraps the others instead of cutting a cost's digits)."""
    for i, name in enumerate(names):
        if name not in _WHOLE:
            table.add_column(name, justify="left" if name == "configuration" else justify)
            continue
        width = max([len(name)] + [len(row[i]) for row in cells])
        table.add_column(name, justify=justify, no_wrap=True, min_width=width)
