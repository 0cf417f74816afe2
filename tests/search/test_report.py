"""Report data on a hand-made study: rows, deltas, Pareto front, files, recipe export."""

from __future__ import annotations

import csv
import itertools
import json
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from an_search.errors import OutputDirError
from an_search.layers import AttentiveNorm
from an_search.rewrite import Recipe, build_from_recipe
from an_search.search import (
    dashboard_command,
    export_top,
    pareto_front,
    study_table,
    write_report,
)

KW = {"num_classes": 10}


def _recipe(sites: dict[str, int]) -> dict:
    return Recipe.from_selection(model="resnet10t", selected=sites, model_kwargs=KW).to_dict()


def _trial(number_attrs: dict, state: TrialState = TrialState.COMPLETE, value=None, **kw):
    return create_trial(state=state, value=value, user_attrs=number_attrs, **kw)


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    s = optuna.create_study(direction="maximize", study_name="handmade")
    s.set_user_attr("model", "resnet10t")
    paper = _recipe({"layer1.0.bn1": 10, "layer2.0.bn1": 10})
    best = _recipe({"layer3.0.bn1": 4})
    worse = _recipe({"layer4.0.bn2": 6})
    common = {"params": 5_000_000, "latency_ms": 3.0, "wall_s": 1.0, "steps": 18}

    def hist(*top1: float) -> list[dict]:
        return [{"epoch": i + 1, "top1": v} for i, v in enumerate(top1)]

    rows = [
        ({"baseline": "bn", "macs": 22.5e6, "recipe": _recipe({}), "n_sites": 0}, 50.0),
        ({"baseline": "paper", "macs": 22.6e6, "recipe": paper, "n_sites": 2}, 52.0),
        ({"macs": 22.7e6, "recipe": best, "n_sites": 1, "config_key": "b"}, 55.0),
        ({"macs": 22.8e6, "recipe": worse, "n_sites": 1, "config_key": "w"}, 51.0),
    ]
    for attrs, value in rows:
        attrs = {**common, **attrs, "history": hist(value - 2, value)}
        s.add_trial(_trial(attrs, value=value, system_attrs={"constraints:max_params": -0.1}))
    s.add_trial(
        _trial(
            {**common, "macs": 22.7e6, "history": hist(30.0), "prune_reason": "hyperband"},
            TrialState.PRUNED,
            intermediate_values={1: 30.0},
        )
    )
    over = {**common, "macs": 30e6, "infeasible": ["params"], "steps": 0, "n_sites": 5}
    s.add_trial(_trial(over, value=0.0, system_attrs={"constraints:max_params": 0.2}))
    dup = {**common, "macs": 22.7e6, "recipe": best, "n_sites": 1, "config_key": "b"}
    s.add_trial(_trial({**dup, "duplicate_of": 2, "steps": 0}, value=55.0))
    s.add_trial(_trial({"fail_reason": "worker gone"}, TrialState.FAIL))
    return s


def test_rows_states_and_deltas(study: optuna.Study) -> None:
    rows = study_table(study)
    assert [r["number"] for r in rows] == list(range(8))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4 + [
        "PRUNED",
        "COMPLETE",
        "COMPLETE",
        "FAIL",
    ]
    by = {r["number"]: r for r in rows}
    assert by[0]["configuration"].startswith("unconverted baseline")
    assert by[2]["delta_bn"] == pytest.approx(5.0) and by[2]["delta_paper"] == pytest.approx(3.0)
    assert by[3]["delta_bn"] == pytest.approx(1.0) and by[3]["delta_paper"] == pytest.approx(-1.0)
    assert by[4]["top1"] is None and by[4]["last_top1"] == 30.0 and by[4]["reason"] == "hyperband"
    assert by[5]["infeasible"] and by[5]["top1"] is None and by[5]["delta_bn"] is None
    assert by[6]["duplicate_of"] == 2 and by[6]["top1"] == 55.0
    assert by[7]["reason"] == "worker gone" and by[7]["top1"] is None
    assert by[2]["gmacs"] == pytest.approx(0.0227)
    # Optuna agrees that the over-budget trial is not the best one.
    assert study.best_trial.number in (2, 6)


@pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage"
)
def test_a_trial_the_heartbeat_failed_gets_a_reason_and_its_retry(tmp_path: Path) -> None:
    """Optuna's heartbeat fails a silent worker's trial with no reason: the report says what
    is known, and names the retry that re-queued it."""
    from an_search.search.storage import RetryStaleTrial

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'hb.db'}",
        heartbeat_interval=1,
        grace_period=1,
        heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=1),
    )
    s = optuna.create_study(storage=storage, direction="maximize")
    silent = s.ask()
    storage.record_heartbeat(silent._trial_id)  # then its worker goes silent
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(s)
    rows = study_table(s)
    assert [r["state"] for r in rows] == ["FAIL", "WAITING"]
    reason = rows[0]["reason"]
    assert "heartbeat" in reason and reason.endswith("; retried as trial 1")
    assert rows[1]["reason"] is None


def test_a_running_trial_whose_worker_is_gone_says_so(tmp_path: Path) -> None:
    """A killed search leaves its trial RUNNING until the next run fails it; the report tells
    it from a trial that is still training."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'study.db'}"
    s = optuna.create_study(storage=url, study_name="killed", direction="maximize")
    child = (
        "import optuna; from an_search.search.storage import record_worker; "
        f"record_worker(optuna.load_study(study_name='killed', storage={url!r}).ask())"
    )
    subprocess.run([sys.executable, "-c", child], check=True)  # it records itself, then ends
    from an_search.search.storage import record_worker

    record_worker(s.ask())  # this live process's trial
    gone, live = study_table(s)
    assert gone["state"] == live["state"] == "RUNNING"
    assert gone["reason"].startswith("its worker process ") and "is gone" in gone["reason"]
    assert live["reason"] is None


def test_pareto_front_matches_brute_force(study: optuna.Study) -> None:
    rows = study_table(study)
    front = pareto_front(rows)
    cands = [r for r in rows if r["top1"] is not None and r["duplicate_of"] is None]
    expected = [
        r["number"]
        for r in cands
        if not any(
            (o["top1"], -o["gmacs"]) != (r["top1"], -r["gmacs"])
            and o["top1"] >= r["top1"]
            and o["gmacs"] <= r["gmacs"]
            for o in cands
        )
    ]
    assert sorted(r["number"] for r in front) == sorted(expected) == [0, 1, 2]
    assert [r["gmacs"] for r in front] == sorted(r["gmacs"] for r in front)


def test_report_files(study: optuna.Study, tmp_path: Path) -> None:
    paths = write_report(study, tmp_path / "report")
    assert set(paths) == {"csv", "json", "pareto", "history"}
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["number"]) for r in table] == list(range(8))
    assert table[5]["infeasible"] == "True" and table[5]["over_budget"] == '["params"]'
    data = json.loads(paths["json"].read_text())
    assert data["pareto"] == [0, 1, 2] and data["model"] == "resnet10t"
    assert data["states"] == {"COMPLETE": 5, "PRUNED": 1, "INFEASIBLE": 1, "FAIL": 1}
    assert set(data["baselines"]) == {"bn", "paper"}
    for kind in ("pareto", "history"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert paths[kind].stat().st_size > 10_000
    assert not list((tmp_path / "report").glob(".*.tmp"))  # no temporaries left


def test_export_top_writes_loadable_recipes(study: optuna.Study, tmp_path: Path) -> None:
    dirs = export_top(study, 3, tmp_path / "top")
    # trial 6 repeats trial 2's model; the BN baseline has no AN; trial 5 is over budget.
    assert [d.name for d in dirs] == ["rank1_trial2", "rank2_trial1", "rank3_trial3"]
    recipe = Recipe.from_json((dirs[0] / "recipe.json").read_text())
    assert recipe.site_k() == {"layer3.0.bn1": 4}
    model = build_from_recipe(recipe)
    assert isinstance(model.get_submodule("layer3.0.bn1"), AttentiveNorm)
    assert export_top(study, 1, tmp_path / "one")[0].name == "rank1_trial2"


def test_a_hand_added_trial_without_its_recipe_is_not_exported(
    study: optuna.Study, tmp_path: Path
) -> None:
    """A trial added by hand with a top-1 and sites but no recipe ranks nowhere (before:
    export failed on it with KeyError 'recipe'); the others export as without it."""
    other = optuna.create_study(direction="maximize", study_name="handmade")
    for t in study.get_trials():
        other.add_trial(t)
    other.add_trial(_trial({"n_sites": 3, "config_key": "x"}, value=99.0))
    assert max(r["top1"] or 0 for r in study_table(other)) == 99.0
    assert [d.name for d in export_top(other, 3, tmp_path / "top")] == [
        "rank1_trial2", "rank2_trial1", "rank3_trial3",
    ]  # fmt: skip


def test_dashboard_command_quotes() -> None:
    assert (
        dashboard_command("sqlite:///a b/study.db") == "optuna-dashboard 'sqlite:///a b/study.db'"
    )
    assert dashboard_command("/runs/j.log") == "optuna-dashboard /runs/j.log"


def test_dashboard_command_names_the_driver_and_hides_the_password() -> None:
    """The printed command opens what an-search opened (SQLAlchemy 2.1 reads a bare
    ``postgresql://`` as psycopg 3, which the ``postgres`` extra does not install), and prints
    no password."""
    from importlib.util import find_spec

    psycopg2_only = find_spec("psycopg") is None and find_spec("psycopg2") is not None
    scheme = "postgresql+psycopg2" if psycopg2_only else "postgresql"
    command = dashboard_command("postgresql://alice:s3cret@db.example:5432/an_search")
    assert command == f"optuna-dashboard '{scheme}://alice:***@db.example:5432/an_search'"


def test_export_again_removes_only_its_own_stale_recipe_folders(
    study: optuna.Study, tmp_path: Path
) -> None:
    top = tmp_path / "top"
    first = export_top(study, 3, top)
    (first[2] / "retrain").mkdir()  # a retrain run inside: kept
    foreign = top / "rank2_trial99"  # no trial 99 here: another study's export
    foreign.mkdir()
    (foreign / "recipe.json").write_text("{}")
    (top / "notes").mkdir()
    dirs = export_top(study, 1, top)
    assert dirs == first[:1]  # (rank 2's folder, this study's: removed)
    assert sorted(p.name for p in top.iterdir()) == sorted(
        [first[0].name, first[2].name, "rank2_trial99", "notes", "export.json"]
    )
    assert json.loads((top / "export.json").read_text()) == {
        "study": "handmade",
        "started": study.trials[0].datetime_start.isoformat(),
        "folders": [first[0].name],
    }


def test_export_never_replaces_another_studys_recipe(study: optuna.Study, tmp_path: Path) -> None:
    """Two studies (or two of one name, in another storage) exported into one folder: the second
    neither deletes the first's recipes nor writes over them. (Before: "an-search export B
    --output shared" deleted A's rank folders, and replaced a rank folder of the same name.)"""
    top = tmp_path / "top"
    dirs = export_top(study, 3, top)
    other = optuna.create_study(direction="maximize", study_name="other")
    recipe = _recipe({"layer2.0.bn2": 8})
    other.add_trial(_trial({"recipe": recipe, "n_sites": 1, "config_key": "z"}, value=99.0))
    other.add_trial(_trial({"recipe": recipe, "n_sites": 1, "config_key": "z"}, value=98.0))

    def files() -> dict[str, str]:
        return {str(p.relative_to(top)): p.read_text() for p in top.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(OutputDirError, match="holds the export of study 'handmade': give study "):
        export_top(other, 1, top)
    assert files() == before
    (top / "export.json").unlink()  # (an export from before export.json: nothing says whose)
    (mine,) = export_top(other, 1, top)  # rank1_trial0: no folder of that name yet
    assert {d: (d / "recipe.json").read_text() for d in dirs} == {
        d: before[f"{d.name}/recipe.json"] for d in dirs
    }
    assert json.loads((mine / "recipe.json").read_text()) == recipe
    theirs = json.loads((dirs[0] / "recipe.json").read_text())
    (mine / "recipe.json").write_text(json.dumps(theirs))  # another study's, in that name
    (top / "export.json").unlink()
    with pytest.raises(OutputDirError, match=r"holds a recipe that is not trial 0's of study "):
        export_top(other, 1, top)
    assert json.loads((mine / "recipe.json").read_text()) == theirs


def test_export_of_another_study_of_the_same_name_is_refused(
    study: optuna.Study, tmp_path: Path
) -> None:
    """A run directory whose study was deleted and run again (or two storages' studies of one
    name, exported to an-runs/NAME/export): the new study's export would sit beside the old
    one's rank folders, two rank 2s of two studies. (Before: kept silently.)"""
    top = tmp_path / "top"
    export_top(study, 3, top)
    again = optuna.create_study(direction="maximize", study_name="handmade")
    attrs = {"recipe": _recipe({"layer2.0.bn2": 8}), "n_sites": 1, "config_key": "z"}
    again.add_trial(_trial(attrs, value=99.0))
    before = {str(p): p.read_bytes() for p in top.rglob("*") if p.is_file()}
    with pytest.raises(OutputDirError, match="holds the export of another study named 'handmade'"):
        export_top(again, 1, top)
    assert {str(p): p.read_bytes() for p in top.rglob("*") if p.is_file()} == before


def test_retrain_takes_the_best_an_configuration_and_the_study_data(tmp_path: Path) -> None:
    """BN wins on top-1 here: 'the study's best' to retrain is export's rank 1, an AN model."""
    from cli._retrain import _recipe_from, _searched_on

    run = tmp_path / "run"
    run.mkdir()
    s = optuna.create_study(
        direction="maximize", study_name="bnwins", storage=f"sqlite:///{run / 'study.db'}"
    )
    s.set_user_attr("config", {"data": "/data/three-classes"})
    s.add_trial(_trial({"baseline": "bn", "recipe": _recipe({}), "n_sites": 0}, value=60.0))
    an = _recipe({"layer3.0.bn1": 4})
    s.add_trial(_trial({"recipe": an, "n_sites": 1, "config_key": "a", "macs": 1e6}, value=55.0))
    notes: list[str] = []
    recipe, where, study, chosen = _recipe_from(run, None, None, notes.append)
    assert recipe.site_k() == {"layer3.0.bn1": 4} and where == run and not notes
    assert _searched_on(study) == ("/data/three-classes", "")  # (path, timm dataset name)
    assert chosen == "trial 1 of study 'bnwins' (export's rank 1 of 1, proxy top-1 55.00)"


def test_the_front_uses_the_studys_cost_objective(tmp_path: Path) -> None:
    s = optuna.create_study(directions=["maximize", "minimize"], study_name="lat")
    s.set_user_attr("objectives", ["top1", "latency"])
    points = [(60.0, 1.0e9, 5.0), (55.0, 2.0e9, 1.0), (50.0, 0.5e9, 9.0)]  # top1, MACs, ms
    for i, (top1, macs, ms) in enumerate(points):
        attrs = {"recipe": _recipe({"layer3.0.bn1": 4}), "n_sites": 1, "config_key": str(i)}
        attrs |= {"macs": macs, "latency_ms": ms, "params": 5_000_000, "history": []}
        s.add_trial(create_trial(values=[top1, ms], user_attrs=attrs))
    # brute force on (top1 up, latency down): the latency front, not the GMACs one
    front = [
        i
        for i, (t, _, ms) in enumerate(points)
        if not any(t2 >= t and m2 <= ms and (t2, m2) != (t, ms) for t2, _, m2 in points)
    ]
    assert sorted(front) == sorted(t.number for t in s.best_trials) == [0, 1]
    write_report(s, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert sorted(data["pareto"]) == front and data["pareto_cost"] == "latency_ms"


def test_a_folder_holds_one_studys_report(study: optuna.Study, tmp_path: Path) -> None:
    from an_search.errors import OutputDirError
    from an_search.search import SearchConfig, create_or_load_study

    write_report(study, tmp_path)
    before = (tmp_path / "report.json").read_text()
    other = optuna.create_study(study_name="other")
    with pytest.raises(OutputDirError, match="holds the report of study 'handmade'"):
        write_report(other, tmp_path)
    with pytest.raises(OutputDirError, match="give study 'resnet10t-default' its own folder"):
        create_or_load_study(SearchConfig("resnet10t", output_dir=tmp_path))
    assert (tmp_path / "report.json").read_text() == before
    assert not (tmp_path / "study.db").exists()  # refused before the study was stored
    write_report(study, tmp_path)  # the same study: replaced, as on every resume


def test_the_report_table_shows_the_baselines_and_the_best(
    study: optuna.Study, tmp_path: Path
) -> None:
    """A long study's table is the baselines and the --top best distinct configurations, with
    a caption counting the rest (before: every trial, thousands of lines); --top 0: all."""
    import re

    from typer.testing import CliRunner

    from cli.search import app

    run = tmp_path / "run"
    run.mkdir()
    stored = optuna.create_study(
        direction="maximize", study_name="handmade", storage=f"sqlite:///{run / 'study.db'}"
    )
    stored.set_user_attr("model", "resnet10t")
    stored.add_trials(study.get_trials())
    env = {"NO_COLOR": "1", "COLUMNS": "250"}

    def numbers(*args: str) -> tuple[list[int], str]:
        res = CliRunner().invoke(app, ["report", str(run), *args], env=env)
        assert res.exit_code == 0, res.stderr
        table = res.stdout.split("Pareto front")[0]
        return [int(n) for n in re.findall(r"^│ (\d+) ", table, flags=re.MULTILINE)], table

    shown, table = numbers("--top", "1")
    assert shown == [0, 1, 2]  # the baselines, and trial 2 (55.0; its duplicate 6 is not new)
    caption = " ".join(table.split())
    assert "the baselines and the 1 best by top-1 of 8 trials (5 complete, " in caption
    assert all(f"1 {state}" in caption for state in ("pruned", "infeasible", "fail"))
    assert numbers("--top", "2")[0] == [0, 1, 2, 3]  # 2 besides the baselines (before: the
    # paper baseline, 52.0, was one of them, and trial 3, 51.0, was left out)
    assert numbers("--top", "0")[0] == list(range(8))
    shown, table = numbers()  # the default (20) shows a study this short whole
    assert shown == list(range(8)) and "best by top-1" not in table


def test_plots_keep_their_legend_off_the_points_and_count_models(study: optuna.Study) -> None:
    """The legend sits right of the axes (inside, it hid a long study's points), and the
    Pareto plot counts trained models: a duplicate trial is its first trial's point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from an_search.search.plots import history_figure, pareto_figure

    rows = study_table(study)
    figures = [pareto_figure(rows, pareto_front(rows)), history_figure(rows)]
    for fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()
        (ax,) = fig.axes
        legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 > axes.x1 and legend.x1 <= fig.bbox.x1  # beside the axes, in the figure
    pareto = figures[0].axes[0]
    trained = [r for r in rows if r["top1"] is not None and r["duplicate_of"] is None]
    assert len(pareto.collections[0].get_offsets()) == len(trained) == 4  # (not 5 with dup 6)
    assert pareto.get_title() == "(4 trained, 1 pruned, 1 over budget)"


def test_a_trial_added_by_hand_without_its_cost_ranks_after_its_equals() -> None:
    """(Before: two trials of equal top-1, one without ``macs``, raised TypeError comparing
    None with a float.)"""
    from an_search.search import ranked_trials

    s = optuna.create_study(direction="maximize")
    for key, macs in (("a", None), ("b", 2e7)):
        attrs = {"recipe": _recipe({"layer3.0.bn1": 4}), "n_sites": 1, "config_key": key}
        s.add_trial(_trial({**attrs, **({"macs": macs} if macs else {})}, value=55.0))
    assert [t.number for t in ranked_trials(s)] == [1, 0]


def test_plot_tick_labels_do_not_run_together(study: optuna.Study) -> None:
    """A 32-px proxy's GMACs differ in the fifth digit: matplotlib's default ticks printed
    '0.0225000.0225250.022550...' as one string. The history's ticks are trial numbers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from an_search.search.plots import history_figure, pareto_figure

    rows = study_table(study)
    steps = (0.0, 8.2752e-5, 1.0496e-4, 2.0145e-4, 1.1e-4, 6.2e-5, 1.2e-5, 3e-5, 9e-5, 1.5e-4)
    rows = [{**r, "gmacs": 0.022487552 + steps[i % 10]} for i, r in enumerate(rows)]
    for fig in (pareto_figure(rows, pareto_front(rows)), history_figure(rows)):
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        (ax,) = fig.axes
        lo, hi = ax.get_xlim()
        ticks = [
            t for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi
        ]
        boxes = sorted((t.get_window_extent(renderer) for t in ticks), key=lambda b: b.x0)
        assert len(boxes) >= 3
        gaps = [b.x0 - a.x1 for a, b in itertools.pairwise(boxes)]
        assert min(gaps) > 5, [t.get_text() for t in ticks]  # (pixels between labels)
    numbers = [t.get_position()[0] for t in fig.axes[0].get_xticklabels()]
    assert all(float(x).is_integer() for x in numbers), numbers


def test_the_csv_holds_the_figures_in_full(tmp_path: Path) -> None:
    """trials.csv is the machine-readable table: its numbers read back as the JSON's (before:
    6 significant digits, so 0.022487552 GMACs read 0.0224876, and close trials tied)."""
    s = optuna.create_study(direction="maximize", study_name="full")
    attrs = {"recipe": _recipe({"layer3.0.bn1": 4}), "n_sites": 1, "config_key": "a"}
    wall_s = __import__("numpy").float64(12.3456789)  # (numpy's repr: "np.float64(...)")
    s.add_trial(_trial({**attrs, "macs": 22_487_552, "wall_s": wall_s}, value=100 / 3))
    paths = write_report(s, tmp_path)
    with paths["csv"].open() as f:
        (row,) = list(csv.DictReader(f))
    (full,) = json.loads(paths["json"].read_text())["trials"]
    floats = {k: v for k, v in full.items() if isinstance(v, float)}
    assert {"top1", "gmacs"} <= set(floats)
    assert {k: float(row[k]) for k in floats} == floats
