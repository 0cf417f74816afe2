"""A search process killed with SIGKILL in the middle of a trial, then resumed.

The first process runs the search on a SQLite file; once trial 0 (the BN baseline) is complete
and trial 1 (the paper baseline) is running in its worker, the test kills it with SIGKILL. A
second search on the same storage must keep trial 0 as it was, end trial 1 FAIL (its worker is
gone), and enqueue the paper baseline again, since no trial of it finished.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

import optuna
from optuna.trial import TrialState

from an_search.search import SearchConfig, run_search, study_table

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, torch
torch.set_num_threads(1)
from an_search.search import SearchConfig, run_search
from an_search.train import TrainConfig
train = TrainConfig(**{train!r})
run_search(SearchConfig("resnet10t", output_dir=sys.argv[1], study_name="killed", n_trials=3,
                        train=train))
"""


def _wait_for_study(db: Path, child: subprocess.Popen, limit_s: float) -> optuna.Study:
    """The child's study, once it exists (the file appears before the study is in it)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        if db.exists():  # read-only peek: never write to the child's database while it starts
            try:
                with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                    names = [r[0] for r in con.execute("SELECT study_name FROM studies")]
            except sqlite3.Error:  # tables not created yet
                names = []
            if "killed" in names:
                try:
                    return optuna.load_study(study_name="killed", storage=f"sqlite:///{db}")
                except KeyError:  # the study row exists, its records are still being written
                    pass
        time.sleep(0.2)
    raise AssertionError(f"the child created no study within {limit_s} s")


def _wait_for_kill_point(study: optuna.Study, child: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        try:
            trials = study.get_trials(deepcopy=False)
        except KeyError:  # a record the child is writing right now ("Record does not exist.")
            time.sleep(0.2)
            continue
        if (
            len(trials) >= 2
            and trials[0].state == TrialState.COMPLETE
            and trials[1].state == TrialState.RUNNING
            and "worker" in trials[1].user_attrs
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"trial 1 never ran within {limit_s} s")


def test_sigkill_mid_trial_then_resume(tmp_path: Path, tiny_train) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(train=asdict(tiny_train())), str(run_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        study = _wait_for_study(run_dir / "study.db", child, 120)
        _wait_for_kill_point(study, child, 120)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    before = study.get_trials()
    assert before[1].state == TrialState.RUNNING  # what a killed process leaves behind
    reason = study_table(study)[1]["reason"]  # the report says so, and what comes next
    assert f"process {child.pid} " in reason
    assert reason.endswith("fails it and queues the baseline again")

    cfg = SearchConfig(
        "resnet10t", output_dir=run_dir, study_name="killed", n_trials=1, train=tiny_train()
    )
    after = run_search(cfg).get_trials()
    assert (after[0].state, after[0].values) == (TrialState.COMPLETE, before[0].values)
    assert after[0].user_attrs == before[0].user_attrs
    assert after[1].state == TrialState.FAIL
    assert str(child.pid) in after[1].user_attrs["fail_reason"]
    assert after[2].user_attrs["baseline"] == "paper" and after[2].state == TrialState.COMPLETE
    assert not [t for t in after if t.state == TrialState.RUNNING]
    assert [t.number for t in after] == [0, 1, 2]
    assert study_table(study)[1]["reason"].endswith("; retried as trial 2")
