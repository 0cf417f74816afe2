"""A trial that waits for a twin (the same model, another worker): what it waits for, and a
twin whose worker dies meanwhile. Real SQLite studies, real (ended) processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from an_search.search import objective
from an_search.search.objective import Objective
from an_search.search.storage import RetryStaleTrial, record_worker


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", direction="maximize")


def _wait(trial: optuna.trial.Trial, key: str, limit: float) -> tuple[object, float]:
    """``_finished_twin`` in a thread (the old code could wait forever): its result, time."""
    out: list[object] = []
    start = time.monotonic()
    waiter = threading.Thread(
        target=lambda: out.append(Objective._finished_twin(None, trial, key)),  # type: ignore[arg-type]
        daemon=True,
    )
    waiter.start()
    waiter.join(limit)
    assert out, f"still waiting after {limit} s"
    return out[0], time.monotonic() - start


def test_a_trial_no_an_search_worker_started_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RUNNING trial without a recorded worker (a user's ``study.ask()``) stops counting as
    "maybe building this model" once it is older than _UNCLAIMED_S; an an-search trial (its
    worker recorded) is waited for up to _BUILD_WAIT_S. (Before: 120 s per trial.)"""
    monkeypatch.setattr(objective, "_UNCLAIMED_S", 0.5, raising=False)
    monkeypatch.setattr(objective, "_BUILD_WAIT_S", 3.0)
    study = _study(tmp_path)
    study.ask()  # the user's, left RUNNING
    time.sleep(0.6)
    mine = study.ask()
    found, took = _wait(mine, "k", 10)
    assert found is None and took < 2.0
    building = study.ask()
    record_worker(building)  # this live process: a worker that has not recorded a key yet
    later = study.ask()
    found, took = _wait(later, "k", 10)
    assert found is None and took >= 3.0


def test_a_twin_whose_worker_died_is_failed_and_not_waited_for(tmp_path: Path) -> None:
    study = _study(tmp_path)
    twin = study.ask()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    twin.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid, "start": "0"})
    twin.set_user_attr("config_key", "k")
    mine = study.ask()
    found, _ = _wait(mine, "k", 20)
    assert found is None
    dead = study.get_trials()[twin.number]
    assert dead.state == TrialState.FAIL and "is gone" in dead.user_attrs["fail_reason"]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_retry_keeps_the_configuration_not_the_dead_runs_records(tmp_path: Path) -> None:
    """What RetryStaleTrial queues: the params, the baseline, the retry chain; not the dead
    trial's fail_reason, worker, key or Hyperband rungs (Optuna's callback copies them all)."""
    study = _study(tmp_path)
    study.enqueue_trial({"x": 0.25}, user_attrs={"baseline": "paper"})
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    for name, value in {"fail_reason": "gone", "config_key": "k", "history": [1]}.items():
        trial.set_user_attr(name, value)
    study._storage.set_trial_system_attr(trial._trial_id, "completed_rung_0", 0.5)
    study.tell(trial, state=TrialState.FAIL)
    RetryStaleTrial(max_retry=1)(study, study.get_trials()[0])
    retry = study.get_trials()[1]
    assert retry.state == TrialState.WAITING and retry.params == {"x": 0.25}
    assert retry.user_attrs == {"baseline": "paper"}
    assert retry.system_attrs == {
        "fixed_params": {"x": 0.25}, "failed_trial": 0, "retry_history": [0],
    }  # fmt: skip
    RetryStaleTrial(max_retry=1)(study, retry)  # (a second retry of the chain: none, max 1)
    assert len(study.get_trials()) == 2


def test_two_processes_that_find_the_same_dead_trial_fail_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting workers look for dead twins every poll: the one whose state change lands fails
    the trial; the other, working from its earlier list, goes on (before: Optuna's
    UpdateFinishedTrialError killed that worker)."""
    from an_search.search.storage import fail_dead_worker_trials

    url = f"sqlite:///{tmp_path}/s.db"
    first = optuna.create_study(storage=url, study_name="s", direction="maximize")
    second = optuna.load_study(storage=url, study_name="s")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = first.ask()
    dead.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid, "start": "0"})
    stale = second.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert fail_dead_worker_trials(first, unowned=False) == [dead.number]
    monkeypatch.setattr(second, "get_trials", lambda **kwargs: stale)
    assert fail_dead_worker_trials(second, unowned=False) == []
    assert [t.state for t in first.get_trials()] == [TrialState.FAIL]


def test_a_start_time_from_a_clock_ahead_costs_at_most_the_unclaimed_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna's server-database start times are the writer's local clock: a trial from a
    machine whose clock is ahead looks young for hours. This process's own first sighting
    bounds the wait (before: _BUILD_WAIT_S, 120 s, per trial)."""
    import sqlite3
    from datetime import datetime, timedelta

    monkeypatch.setattr(objective, "_UNCLAIMED_S", 1.0, raising=False)
    monkeypatch.setattr(objective, "_BUILD_WAIT_S", 6.0)
    study = _study(tmp_path)
    foreign = study.ask()
    ahead = (datetime.now() + timedelta(hours=3)).isoformat(sep=" ")
    with sqlite3.connect(tmp_path / "s.db") as db:
        db.execute("UPDATE trials SET datetime_start = ? WHERE number = ?", (ahead, foreign.number))
    fresh = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path}/s.db")
    mine = fresh.ask()
    found, took = _wait(mine, "k", 20)
    assert found is None and 1.0 <= took < 4.0
