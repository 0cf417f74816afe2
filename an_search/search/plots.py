"""PNG plots of a study's rows (``report.study_table``): Pareto front and optimisation history.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch, safe
in threads and on machines without a display), then written atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._files import atomic_write

__all__ = ["history_figure", "pareto_figure", "plot_history", "plot_pareto"]

_BASELINE_STYLE = {
    "bn": {"marker": "*", "color": "black", "label": "unconverted baseline"},
    "paper": {"marker": "D", "color": "tab:red", "label": "paper placement"},
}


def plot_pareto(
    rows: list[dict[str, Any]],
    front: list[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    cost: str = "gmacs",
    label: str = "GMACs (multiply-adds, 1e9)",
) -> Path:
    """Top-1 against a cost (row key ``cost``, axis ``label``): every trained feasible model
    (a duplicate trial is its first trial's point), the front as a line, baselines marked."""
    return _save(pareto_figure(rows, front, title=title, cost=cost, label=label), Path(path))


def pareto_figure(
    rows: list[dict[str, Any]],
    front: list[dict[str, Any]],
    *,
    title: str = "",
    cost: str = "gmacs",
    label: str = "GMACs (multiply-adds, 1e9)",
) -> Figure:
    """The figure :func:`plot_pareto` writes."""
    fig = Figure(figsize=(8.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    done = [
        r
        for r in rows
        if r["top1"] is not None and r[cost] is not None and r["duplicate_of"] is None
    ]
    ax.scatter(
        [r[cost] for r in done],
        [r["top1"] for r in done],
        s=18,
        color="tab:blue",
        alpha=0.6,
        label="trials",
    )
    ax.plot(
        [r[cost] for r in front],
        [r["top1"] for r in front],
        "-o",
        color="tab:green",
        ms=5,
        label="Pareto front",
    )
    for name, style in _BASELINE_STYLE.items():
        base = [r for r in done if r["baseline"] == name]
        if base:
            ax.scatter([base[-1][cost]], [base[-1]["top1"]], s=90, zorder=3, **style)
    infeasible = sum(bool(r["infeasible"]) for r in rows)
    pruned = sum(r["state"] == "PRUNED" and r["duplicate_of"] is None for r in rows)
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # (a 32-px proxy's GMACs: 8-digit labels)
    ax.set_ylabel("proxy validation top-1 (%)")
    counts = f"{len(done)} trained, {pruned} pruned, {infeasible} over budget"
    ax.set_title(f"{title}  ({counts})".strip())
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_history(
    rows: list[dict[str, Any]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Top-1 per trial number (pruned trials at their last epoch), best so far, baselines."""
    return _save(history_figure(rows, title=title), Path(path))


def history_figure(rows: list[dict[str, Any]], *, title: str = "") -> Figure:
    """The figure :func:`plot_history` writes."""
    fig = Figure(figsize=(8.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    done = [r for r in rows if r["top1"] is not None]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["last_top1"] is not None]
    ax.scatter([r["number"] for r in done], [r["top1"] for r in done], s=18, label="complete")
    ax.scatter(
        [r["number"] for r in pruned],
        [r["last_top1"] for r in pruned],
        s=18,
        facecolors="none",
        edgecolors="gray",
        label="pruned (last epoch)",
    )
    best, xs, ys = float("-inf"), [], []
    for r in done:
        best = max(best, r["top1"])
        xs.append(r["number"])
        ys.append(best)
    if xs:  # carry the best to the last trial, whatever its state
        xs.append(max(r["number"] for r in rows))
        ys.append(best)
    ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    for name, style in _BASELINE_STYLE.items():
        base = [r for r in done if r["baseline"] == name]
        if base:
            ax.axhline(base[-1]["top1"], ls="--", lw=1, color=style["color"], label=style["label"])
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("proxy validation top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def _legend_outside(ax: Any) -> None:
    """The legend right of the axes: inside, it hid points of a long study."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.figure.tight_layout()


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return atomic_write(path, buf.getvalue())
