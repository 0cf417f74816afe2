"""A real study on CPU: resnet10t on the embedded Animal-MNIST, 10 trials, then resume.

Deterministic settings (stated for the pruning claim): TPE seed 0 (its first 10 trials are
seeded random draws), study name "e2e" (Hyperband's bracket of a trial is crc32 of the name and
number), one thread, every trial trained with seed 0. The space has 12 configurations; the budget
is the paper placement's parameter count, computed below from the paper's formula, so K=32
configurations are over it; one of them is enqueued as trial 2. Hyperband: min_resource 1,
reduction factor 2, 3 epochs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import timm
import yaml
from optuna.trial import TrialState

import an_search.search.build as build_module
from an_search.errors import BudgetError, StorageError
from an_search.search import (
    NO_PRUNING_MESSAGE,
    SearchConfig,
    create_or_load_study,
    prepare_search,
    run_search,
    study_table,
    write_report,
)
from an_search.train import resolve_data
from an_search.train.data import EMBEDDED_ROOT

SPACE = {
    "placement": {"type": "categorical", "choices": ["paper", "last-in-block"]},
    "k": {"type": "categorical", "choices": [4, 8, 32], "shared": True},
    "head": {"type": "categorical", "choices": ["default", "bn-sigmoid"]},
}
OVER_BUDGET = {"placement": "last-in-block", "k": 32, "head": "default"}
N_TRIALS = 10


def _bn_params() -> int:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    return sum(p.numel() for p in model.parameters())


def _paper_params() -> int:
    """AN at each block's bn1 (C = 64, 128, 256, 512), K 10/10/20/20: 3KC + 2K - 2C per site."""
    return _bn_params() + sum(
        3 * k * c + 2 * k - 2 * c
        for k, c in zip((10, 10, 20, 20), (64, 128, 256, 512), strict=True)
    )


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, tiny_train) -> SimpleNamespace:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e2e")
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    cfg = SearchConfig(
        "resnet10t",
        space=space,
        output_dir=root / "run",
        study_name="e2e",
        n_trials=N_TRIALS,
        seed=0,
        train=tiny_train(),
        max_params=_paper_params(),
        hyperband_reduction_factor=2,
    )
    start = time.perf_counter()
    # Trial 2, after the two baselines: a configuration over the budget, whatever TPE draws.
    create_or_load_study(cfg)[0].enqueue_trial(OVER_BUDGET)
    study = run_search(cfg)
    wall = time.perf_counter() - start
    return SimpleNamespace(cfg=cfg, study=study, root=root, wall=wall, rows=study_table(study))


def test_baselines_come_first_and_train_in_full(e2e: SimpleNamespace) -> None:
    trials = e2e.study.get_trials()
    assert len(trials) == N_TRIALS
    bn, paper = trials[0], trials[1]
    assert bn.user_attrs["baseline"] == "bn" and paper.user_attrs["baseline"] == "paper"
    assert bn.user_attrs["params"] == _bn_params() and bn.user_attrs["n_sites"] == 0
    assert paper.user_attrs["params"] == _paper_params() and paper.user_attrs["n_sites"] == 4
    for t in (bn, paper):
        assert t.state == TrialState.COMPLETE
        assert t.user_attrs["steps"] == 3 * 6 and len(t.user_attrs["history"]) == 3
        assert t.value == t.user_attrs["history"][-1]["top1"] == t.intermediate_values[3]
    assert all("baseline" not in t.user_attrs for t in trials[2:])


def test_every_trial_finished_with_its_attributes(e2e: SimpleNamespace) -> None:
    trials = e2e.study.get_trials()
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in trials:
        a = t.user_attrs
        assert {"config", "recipe", "params", "macs", "latency_ms", "wall_s"} <= set(a)
        assert a["latency_ms"] > 0 and a["macs"] > 0 and a["cost_input_size"] == [3, 32, 32]
        assert a["worker"]["pid"] > 0
        assert set(t.constraints) == {"max_params"}
        assert t.constraints["max_params"] == pytest.approx(a["params"] / _paper_params() - 1)


def test_hyperband_pruned_a_trial(e2e: SimpleNamespace) -> None:
    pruned = [
        t
        for t in e2e.study.get_trials(states=(TrialState.PRUNED,))
        if t.user_attrs["prune_reason"].startswith("hyperband at epoch")
    ]
    assert pruned, [(r["state"], r["reason"]) for r in e2e.rows]
    for t in pruned:
        epochs = len(t.user_attrs["history"])
        assert 1 <= epochs < 3 and t.user_attrs["steps"] == epochs * 6
        assert max(t.intermediate_values) == epochs


def test_budget_rejects_without_training(e2e: SimpleNamespace) -> None:
    over = [t for t in e2e.study.get_trials() if t.user_attrs.get("infeasible")]
    assert over[0].number == 2 and over[0].params == OVER_BUDGET
    for t in over:
        assert t.state == TrialState.COMPLETE and t.value == 0.0
        assert t.user_attrs["infeasible"] == ["params"]
        assert t.user_attrs["steps"] == 0 and "history" not in t.user_attrs
        assert t.user_attrs["params"] > _paper_params() and t.constraints["max_params"] > 0
        assert not t.intermediate_values
    assert "infeasible" not in e2e.study.best_trial.user_attrs


def test_reports_written(e2e: SimpleNamespace) -> None:
    paths = write_report(e2e.study, e2e.root / "report")
    data = json.loads(paths["json"].read_text())
    assert len(data["trials"]) == N_TRIALS and data["metric_names"] == ["top1"]
    assert set(data["baselines"]) == {"bn", "paper"}
    lines = paths["csv"].read_text().splitlines()
    assert len(lines) == N_TRIALS + 1 and lines[0].startswith("number,state,baseline")
    for kind in ("pareto", "history"):
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    by = {r["number"]: r for r in e2e.rows}
    assert by[0]["delta_bn"] == 0.0 and by[1]["delta_paper"] == 0.0
    assert by[1]["delta_bn"] == pytest.approx(by[1]["top1"] - by[0]["top1"])


def test_optuna_cli_reads_the_study(e2e: SimpleNamespace) -> None:
    url = f"sqlite:///{(e2e.root / 'run' / 'study.db').resolve()}"
    optuna_cli = Path(sys.executable).parent / "optuna"
    out = subprocess.run(
        [str(optuna_cli), "trials", "--storage", url, "--study-name", "e2e", "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = json.loads(out)
    assert [r["number"] for r in rows] == list(range(N_TRIALS))
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}


def test_resume_continues_and_reuses_duplicates(
    e2e: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run on (a copy of) the same storage adds trials after the first run's."""
    timed: list[int] = []  # the real timing, counted: a duplicate's model is not timed again
    measure = build_module.measure_latency_ms
    monkeypatch.setattr(
        build_module, "measure_latency_ms", lambda *a, **k: timed.append(1) or measure(*a, **k)
    )
    db = tmp_path / "resumed.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    cfg = replace(e2e.cfg, storage=db, n_trials=1)
    trained = next(
        t
        for t in e2e.study.get_trials()
        if t.params and t.user_attrs.get("steps") and "duplicate_of" not in t.user_attrs
    )
    study, _ = create_or_load_study(cfg)
    study.enqueue_trial(trained.params)  # the same configuration again: must not train
    study = run_search(cfg)
    trials = study.get_trials()
    assert len(trials) == N_TRIALS + 1
    new = trials[N_TRIALS]
    assert new.number == N_TRIALS and new.params == trained.params
    assert new.user_attrs["duplicate_of"] == trained.number and new.user_attrs["steps"] == 0
    assert new.state == trained.state and new.values == trained.values
    for cost in ("params", "macs", "latency_ms"):  # one model, one cost: not measured again
        assert new.user_attrs[cost] == trained.user_attrs[cost]
    assert timed == []
    assert sum("baseline" in t.user_attrs for t in trials) == 2  # not enqueued again
    for old, again in zip(e2e.study.get_trials(), trials[:N_TRIALS], strict=True):
        assert (old.number, old.state, old.values) == (again.number, again.state, again.values)


def test_budget_no_configuration_meets(e2e: SimpleNamespace, tmp_path: Path) -> None:
    cfg = replace(e2e.cfg, output_dir=tmp_path / "run", max_params=_bn_params() - 1)
    with pytest.raises(BudgetError) as info:
        run_search(cfg)
    message = str(info.value)
    assert "\n" not in message and "max_params" in message and f"{_bn_params():,}" in message
    assert not (tmp_path / "run").exists()  # refused before any storage or training


def test_unopenable_storage(e2e: SimpleNamespace, tmp_path: Path) -> None:
    cfg = replace(e2e.cfg, storage="sqlite:////nonexistent-dir/sub/study.db", max_params=None)
    with pytest.raises(StorageError, match="cannot be opened"):
        create_or_load_study(cfg)


def test_resume_with_another_model_is_refused(e2e: SimpleNamespace, tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    with pytest.raises(StorageError, match="same model and objectives"):
        create_or_load_study(replace(e2e.cfg, model="resnet18", storage=db))
    with pytest.raises(StorageError, match="same model and objectives"):
        create_or_load_study(replace(e2e.cfg, objectives="top1,macs", storage=db))


def test_several_objectives_use_nsga2_without_pruning(tmp_path: Path, tiny_train) -> None:
    cfg = SearchConfig(
        "resnet10t",
        output_dir=tmp_path / "run",
        study_name="mo",
        objectives="top1,params",
        n_trials=1,
        train=tiny_train(epochs=1),
    )
    messages: list[str] = []
    study = run_search(cfg, on_message=messages.append)
    assert messages == [NO_PRUNING_MESSAGE]
    assert isinstance(study.sampler.inner, optuna.samplers.NSGAIISampler)
    assert isinstance(study.pruner, optuna.pruners.NopPruner)
    assert study.metric_names == ["top1", "mparams"]
    (bn,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert bn.values == [bn.user_attrs["top1"], pytest.approx(_bn_params() / 1e6)]


def test_non_finite_loss_prunes_with_its_reason(tmp_path: Path, tiny_train) -> None:
    cfg = SearchConfig(
        "resnet10t",
        output_dir=tmp_path / "run",
        study_name="nan",
        n_trials=1,
        train=tiny_train(epochs=1, lr=1e12, label_smoothing=0.0),
    )
    trial = run_search(cfg).get_trials()[0]  # the BN baseline; the paper one still waits
    assert trial.state == TrialState.PRUNED
    assert "loss" in trial.user_attrs["prune_reason"]


def test_a_refused_configuration_fails_only_its_trial(
    tmp_path: Path, tiny_train, monkeypatch: pytest.MonkeyPatch
) -> None:
    from an_search.errors import InvalidKError
    from an_search.search import Objective

    def refuse(self: Objective, config: dict) -> None:
        raise InvalidKError(f"K list has 3 values but the model has 4 stages: {config}")

    monkeypatch.setattr(Objective, "build", refuse)
    cfg = SearchConfig("resnet10t", output_dir=tmp_path / "run", n_trials=2, train=tiny_train())
    study = run_search(cfg)  # returns: the study went on after trial 0 failed
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    reason = study.get_trials()[1].user_attrs["fail_reason"]
    assert reason.startswith("InvalidKError: K list has 3 values")
    assert study_table(study)[1]["reason"] == reason


def test_the_run_stores_the_total_a_joining_worker_stops_at(
    e2e: SimpleNamespace, tmp_path: Path
) -> None:
    from an_search.search import join_config, run_workers

    assert e2e.study.user_attrs["target_trials"] == N_TRIALS == len(e2e.study.trials)
    db = tmp_path / "joined.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    joined = run_workers(join_config(str(db), "e2e", output_dir=tmp_path / "w"), join=True)
    assert len(joined.trials) == N_TRIALS  # the study holds its total: the worker adds nothing
    optuna.load_study(study_name="e2e", storage=f"sqlite:///{db}").set_user_attr(
        "target_trials", None
    )  # a study from before totals were stored: a worker without a bound is refused
    with pytest.raises(StorageError, match="no trial total.*--n-trials or --timeout"):
        run_workers(join_config(str(db), "e2e", output_dir=tmp_path / "w"), join=True)


def test_a_worker_joins_through_the_run_directory(e2e: SimpleNamespace, tmp_path: Path) -> None:
    """`an-search worker --storage RUN_DIR` (as `report` takes it): the run directory's study
    file is the storage the worker shares."""
    from an_search.search import join_config, run_workers

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(e2e.root / "run" / "study.db", copy / "study.db")
    joined = join_config(str(copy), "e2e", output_dir=tmp_path / "w")
    assert joined.storage == f"sqlite:///{copy / 'study.db'}"
    assert len(run_workers(joined, join=True).trials) == N_TRIALS  # (its total: all done)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"train": {"epochs": 1}}, "train.epochs 3, this call has 1"),
        ({"train": {"img_size": 48}}, "train.img_size 32, this call has 48"),
        ({"cost_img_size": 64}, "cost_img_size None, this call has 64"),
        ({"max_params": 5e6}, "max_params 4977658, this call has 5000000.0"),
        ({"max_macs": 3e7}, "max_macs None, this call has 30000000.0"),
        ({"space": "paper-neighbourhood"}, "space 'space', this call has 'paper-neighbourhood'"),
    ],
)
def test_resume_with_other_settings_is_refused(
    e2e: SimpleNamespace, tmp_path: Path, change: dict, needle: str
) -> None:
    """Trials trained on another schedule or size do not compare: refused, nothing added."""
    db = tmp_path / "other.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    train = replace(e2e.cfg.train, **change.pop("train", {}))
    cfg = replace(e2e.cfg, storage=db, n_trials=1, train=train, **change)
    with pytest.raises(StorageError) as info:
        run_search(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert len(optuna.load_study(study_name="e2e", storage=f"sqlite:///{db}").trials) == N_TRIALS


def test_a_study_stored_with_an_infinite_budget_resumes_without_one(
    e2e: SimpleNamespace, tmp_path: Path
) -> None:
    """Versions before budgets were checked took ``--max-macs inf`` (no limit) and stored it:
    such a study resumes, and is joined, as one without that budget."""
    from an_search.search import join_config

    db = tmp_path / "inf.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    stored = optuna.load_study(study_name="e2e", storage=f"sqlite:///{db}")
    assert stored.user_attrs["config"]["max_macs"] is None
    stored.set_user_attr("config", {**stored.user_attrs["config"], "max_macs": float("inf")})
    assert len(run_search(replace(e2e.cfg, storage=db, n_trials=1)).trials) == N_TRIALS + 1
    assert join_config(str(db), "e2e", output_dir=tmp_path / "w").max_macs is None
    with pytest.raises(StorageError, match="max_macs None, this call has 30000000.0"):
        run_search(replace(e2e.cfg, storage=db, max_macs=3e7))  # (a budget now is another one)


def test_resume_with_other_space_text_and_free_settings(
    e2e: SimpleNamespace, tmp_path: Path
) -> None:
    db = tmp_path / "other.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    edited = tmp_path / "space.yaml"  # same file name, other choices
    edited.write_text(
        yaml.safe_dump({**SPACE, "head": {"type": "categorical", "choices": ["mlp"]}})
    )
    with pytest.raises(StorageError, match="the space file's text 'one text', this call has"):
        create_or_load_study(replace(e2e.cfg, storage=db, space=edited))
    # where and how fast it trains may change (another machine): accepted
    free = replace(e2e.cfg.train, threads=2, workers=1, device="cpu", amp=False)
    study, _ = create_or_load_study(replace(e2e.cfg, storage=db, train=free, data=None))
    assert len(study.trials) == N_TRIALS


def _animal_folder(root: Path, classes: int, per_class: int) -> Path:
    """root/<class>/*.png: the first images of the first classes of the embedded training tar."""
    taken: dict[str, int] = {}
    with tarfile.open(EMBEDDED_ROOT / "train.tar") as tar:
        for member in tar.getmembers():
            name = member.name.split("/")[0]
            if member.isfile() and (name in taken or len(taken) < classes):
                if taken.setdefault(name, 0) < per_class:
                    taken[name] += 1
                    (root / member.name).parent.mkdir(parents=True, exist_ok=True)
                    (root / member.name).write_bytes(tar.extractfile(member).read())
    return root


def test_resume_on_other_data_is_refused(e2e: SimpleNamespace, tmp_path: Path) -> None:
    """Trials trained on other images do not compare: the study keeps what it was run on."""
    stored = e2e.study.user_attrs["data"]
    assert stored == {"classes": list(resolve_data().class_names), "train_images": 8000,
                      "validation_images": 2000}  # fmt: skip
    db = tmp_path / "other.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    three = _animal_folder(tmp_path / "three", classes=3, per_class=40)
    with pytest.raises(StorageError) as info:
        run_search(replace(e2e.cfg, storage=db, n_trials=1, data=three))
    message = str(info.value)
    assert "was run on 10 classes, 8000 training and 2000 validation images" in message
    assert "this call's data has 3 classes, 96 training and 24 validation images" in message
    assert "--data" in message and "\n" not in message
    assert len(optuna.load_study(study_name="e2e", storage=f"sqlite:///{db}").trials) == N_TRIALS
    # the same images under another path (a copy, another machine): accepted
    copy = tmp_path / "copy"
    with tarfile.open(EMBEDDED_ROOT / "train.tar") as tar:
        tar.extractall(copy / "train", filter="data")
    with tarfile.open(EMBEDDED_ROOT / "validation.tar") as tar:
        tar.extractall(copy / "val", filter="data")
    objective, study = prepare_search(replace(e2e.cfg, storage=db, data=copy))
    assert len(study.trials) == N_TRIALS and study.user_attrs["data"] == stored


def test_settings_an_older_study_did_not_store_are_not_compared(
    e2e: SimpleNamespace, tmp_path: Path
) -> None:
    db = tmp_path / "old.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{db}")
    config = study.user_attrs["config"]
    del config["cost_img_size"], config["train"]["label_smoothing"]
    study.set_user_attr("config", config)
    train = replace(e2e.cfg.train, label_smoothing=0.0)
    resumed, _ = create_or_load_study(replace(e2e.cfg, storage=db, train=train, cost_img_size=64))
    assert len(resumed.trials) == N_TRIALS


def test_trials_enqueued_outside_the_space_fail_alone(e2e: SimpleNamespace, tmp_path: Path) -> None:
    """Parameters the space cannot take (enqueued by hand), or an unknown baseline, fail that
    trial with a reason; the study goes on (before: an internal error stopped the run)."""
    db = tmp_path / "enqueued.db"
    shutil.copy(e2e.root / "run" / "study.db", db)
    cfg = replace(e2e.cfg, storage=db, n_trials=3)
    study, _ = create_or_load_study(cfg)
    trained = next(t for t in e2e.study.get_trials() if t.params and t.user_attrs.get("steps"))
    study.enqueue_trial({**trained.params, "placement": "bogus"})
    study.enqueue_trial({}, user_attrs={"baseline": "nosuch"})
    study.enqueue_trial(trained.params)  # a good one after them: reused, not trained
    trials = run_search(cfg).get_trials()[N_TRIALS:]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, trained.state]
    assert (
        trials[0]
        .user_attrs["fail_reason"]
        .startswith("TrialParamsError: the trial's parameters do not fit the space: 'bogus' not in")
    )
    assert trials[1].user_attrs["fail_reason"] == (
        "TrialParamsError: unknown baseline 'nosuch' (known: bn, paper)"
    )
    assert trials[2].user_attrs["duplicate_of"] == trained.number


def test_a_trial_cut_by_ctrl_c_says_so(
    e2e: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from an_search.search import objective

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(objective, "proxy_train", interrupted)
    cfg = replace(e2e.cfg, output_dir=tmp_path / "run", n_trials=1)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg)
    (trial, *_) = optuna.load_study(
        study_name="e2e", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    ).get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "interrupted by SIGINT (Ctrl-C)"
