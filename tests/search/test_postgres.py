"""Workers sharing a study on a real PostgreSQL server; one dies with SIGKILL in mid-trial.

Needs ``AN_SEARCH_TEST_POSTGRES_URL`` (``.ci/run`` starts a throwaway server and sets it);
skipped without it. What it shows: the study made by one machine is joined from its stored
settings (``join_config``, what ``an-search worker`` does); a worker killed while training
leaves its trial RUNNING until the heartbeat goes silent, then the other worker marks it FAIL
(Optuna's heartbeat, not our local pid check: the trial carries no ``fail_reason``), re-queues
it once, runs the retry, and the study reaches its total with nothing left RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from an_search.search import (
    SearchConfig,
    count_trials,
    create_or_load_study,
    fail_dead_worker_trials,
    join_config,
    open_storage,
    run_workers,
)

URL = os.environ.get("AN_SEARCH_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not URL, reason="AN_SEARCH_TEST_POSTGRES_URL is not set (see .ci/run)"),
]
SPACE = {
    "placement": "paper",
    "k": {"type": "categorical", "choices": [4, 8], "shared": True},
    "head": "default",
}
TOTAL = 5


def test_open_storage_has_heartbeat_and_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AN_SEARCH_HEARTBEAT_INTERVAL", "7")
    monkeypatch.setenv("AN_SEARCH_GRACE_PERIOD", "21")
    storage = open_storage(URL)
    assert (storage.heartbeat_interval, storage.grace_period) == (7, 21)
    assert isinstance(
        storage.get_heartbeat_stale_trial_callback(),
        optuna.storages.RetryHeartbeatStaleTrialCallback,
    )


def test_sigkilled_worker_trial_fails_by_heartbeat_and_study_completes(
    tmp_path: Path, tiny_train, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AN_SEARCH_HEARTBEAT_INTERVAL", "1")  # the workers inherit these
    monkeypatch.setenv("AN_SEARCH_GRACE_PERIOD", "3")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    creator = SearchConfig(
        "resnet10t",
        space=space,
        storage=URL,
        study_name=name,
        output_dir=tmp_path / "creator",
        train=tiny_train(epochs=2, batches_per_epoch=4),
    )
    study, _ = create_or_load_study(creator)  # machine 1 created the study...
    study.set_user_attr("target_trials", TOTAL)
    space.unlink()  # ...and its space file is not on this "machine"
    cfg = join_config(URL, name, output_dir=tmp_path / "joiner")
    assert cfg.study_name == name and Path(cfg.space).parent == tmp_path / "joiner"
    assert cfg.train.batches_per_epoch == 4 and cfg.n_trials is None

    killed: list[tuple[int, int]] = []
    killer = threading.Thread(target=_kill_a_training_worker, args=(name, killed), daemon=True)
    killer.start()
    messages: list[str] = []
    study = run_workers(cfg, 2, join=True, on_message=messages.append)
    killer.join(timeout=5)
    assert len(killed) == 1
    number, pid = killed[0]
    assert any("exited with code -9" in m for m in messages)

    trials = study.get_trials()
    victim = trials[number]
    assert victim.state == TrialState.FAIL and victim.user_attrs["worker"]["pid"] == pid
    assert "fail_reason" not in victim.user_attrs  # failed by the heartbeat, not a pid check
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    assert retries[0].user_attrs["config_key"] == victim.user_attrs["config_key"]
    assert [t.number for t in trials] == list(range(len(trials)))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert TOTAL <= count_trials(trials) <= TOTAL + 1  # the retried FAIL is not counted


def _kill_a_training_worker(name: str, killed: list[tuple[int, int]]) -> None:
    """SIGKILL the worker of the first baseline trial seen training (baselines always train)
    once the other worker has started a trial. A worker that starts after the kill would find
    the dead pid on this host in its start-up check and fail the trial before the heartbeat
    does; and the first worker may run every trial before the second has started. So the first
    is frozen (SIGSTOP: alive, its heartbeat silent) in its baseline until the second worker has
    started a trial, then killed: whatever the machine's load, the one path is the heartbeat."""
    study = optuna.load_study(study_name=name, storage=open_storage(URL))
    deadline = time.monotonic() + 240
    frozen: tuple[int, int] | None = None
    while time.monotonic() < deadline and frozen is None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("baseline") and "config_key" in t.user_attrs:
                pid = t.user_attrs["worker"]["pid"]
                os.kill(pid, signal.SIGSTOP)
                _wait_stopped(pid)
                if study._storage.get_trial(t._trial_id).state == TrialState.RUNNING:
                    frozen = (t.number, pid)  # frozen in its training
                    break
                os.kill(pid, signal.SIGCONT)  # it had just finished: look again
        time.sleep(0.05)
    if frozen is None:
        return
    while time.monotonic() < deadline:  # (a deadline: a lock it froze with cannot hang this)
        pids = {t.user_attrs.get("worker", {}).get("pid") for t in study.get_trials()}
        if pids - {None, frozen[1]}:
            break
        time.sleep(0.2)
    os.kill(frozen[1], signal.SIGKILL)
    killed.append(frozen)


def _wait_stopped(pid: int) -> None:
    """Until the kernel shows ``pid`` stopped (SIGSTOP takes effect asynchronously)."""
    for _ in range(200):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # study.ask
def test_dead_local_worker_trial_is_requeued_once_like_the_heartbeat() -> None:
    """The start-up pid check (a worker that died on this host) re-queues the trial it fails on
    a server database, as the heartbeat's retry callback would have."""
    study = optuna.create_study(storage=open_storage(URL), study_name=f"pg-{uuid.uuid4().hex[:8]}")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid, "start": "0"})

    assert fail_dead_worker_trials(study) == [trial.number]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert str(gone.pid) in trials[0].user_attrs["fail_reason"]
    retry = trials[1]
    assert retry.system_attrs["failed_trial"] == trial.number
    assert retry.params == trials[0].params  # the same configuration, asked again
    assert "fail_reason" not in retry.user_attrs and "worker" not in retry.user_attrs
    assert fail_dead_worker_trials(study) == []  # nothing RUNNING left: no second retry


_TWIN = """
import os, sys, time, optuna
from an_search.search import open_storage
study = optuna.load_study(study_name=sys.argv[1], storage=open_storage(sys.argv[2]))
def objective(trial):
    trial.set_user_attr("worker", {"host": "another-machine", "pid": 1, "start": None})
    trial.set_user_attr("config_key", "k")
    print("training", flush=True)
    time.sleep(600)
study.optimize(objective, n_trials=1)
"""


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # study.ask
def test_a_twin_that_another_machine_left_is_failed_by_its_heartbeat_while_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trial waiting for its twin (the same model, trained on another machine) notices when
    that machine dies: the twin's heartbeat goes stale, it is failed and re-queued, and the
    waiting trial trains instead of waiting for ever."""
    from an_search.search.objective import Objective

    monkeypatch.setenv("AN_SEARCH_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("AN_SEARCH_GRACE_PERIOD", "2")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=open_storage(URL), study_name=name)
    twin = subprocess.Popen(
        [sys.executable, "-c", _TWIN, name, URL], stdout=subprocess.PIPE, text=True
    )
    assert twin.stdout is not None and twin.stdout.readline() == "training\n"
    os.kill(twin.pid, signal.SIGKILL)
    twin.wait()
    mine = study.ask()
    found: list[object] = []
    waiter = threading.Thread(
        target=lambda: found.append(Objective._finished_twin(None, mine, "k")),  # type: ignore[arg-type]
        daemon=True,
    )
    waiter.start()
    waiter.join(60)
    assert found == [None]  # nothing finished to reuse: this trial trains
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "fail_reason" not in trials[0].user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert [t.state for t in retry] == [TrialState.WAITING]
    assert "config_key" not in retry[0].user_attrs and "worker" not in retry[0].user_attrs
