"""Several worker processes sharing one study through a journal file, and Ctrl-C stopping them.

The space has four configurations (BN baseline, paper baseline, and K=4 AN after the spatial
convs with two heads), so a study of 6 trials must meet duplicates: the workers must never train
one configuration twice (the later twin waits for, then reuses, the earlier one's result), even
when both sample it at the same moment in different processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from an_search.errors import DataError, StorageError, TrainConfigError
from an_search.search import (
    SearchConfig,
    SharedTrialBudget,
    count_trials,
    open_study,
    plan_workers,
    run_search,
    run_workers,
)

SPACE = {
    "placement": "paper",
    "k": {"type": "categorical", "choices": [4], "shared": True},
    "head": {"type": "categorical", "choices": ["default", "linear-hsigmoid"]},
}
TRAIN = {"epochs": 1, "batches_per_epoch": 2}


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def test_plan_workers_splits_gpus_and_cores() -> None:
    plans = plan_workers(None, gpus=[0, 1, 2, 3], gpus_per_trial=2, cpus=range(8))
    assert [(p.gpus, p.cpus, p.nproc) for p in plans] == [
        ((0, 1), (0, 1, 2, 3), 2),
        ((2, 3), (4, 5, 6, 7), 2),
    ]
    assert [p.gpus for p in plan_workers(3, gpus=[5, 7], cpus=range(6))] == [(5,), (7,), (5,)]
    cpu = plan_workers(2, cpus=[0, 1])
    assert [(p.cpus, p.gpus) for p in cpu] == [((0,), None), ((1,), None)]
    assert [p.cpus for p in plan_workers(3, cpus=[0, 1])] == [(0,), (1,), (0,)]
    with pytest.raises(TrainConfigError, match="groups of 2"):
        plan_workers(None, gpus=[0, 1, 2], gpus_per_trial=2)
    with pytest.raises(TrainConfigError, match="at least 1"):
        plan_workers(0)


def test_sqlite_is_refused_for_several_workers(tmp_path: Path) -> None:
    cfg = SearchConfig("resnet10t", output_dir=tmp_path, storage=tmp_path / "s.db")
    with pytest.raises(StorageError, match="SQLite takes one writer.*journal"):
        run_workers(cfg, 2)
    # joining a SQLite study: a journal would be another study; one worker joins this one
    with pytest.raises(StorageError, match=r"join its study with one worker \(--workers 1\)"):
        run_workers(cfg, 2, join=True)


def test_workers_on_a_run_directory_with_sqlite_are_not_sent_to_a_second_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal beside a one-process run's study.db would hold a new study of the same name,
    whose reports replace the first's: the message points to one process or a new study in
    another run directory, which --study-name makes only when --output does not fix it."""
    run = tmp_path / "run"
    run.mkdir()
    optuna.create_study(storage=f"sqlite:///{run / 'study.db'}", study_name="x")
    with pytest.raises(StorageError) as info:
        run_workers(SearchConfig("resnet10t", output_dir=run, study_name="other"), 2)
    message = str(info.value)
    assert f"{run} holds a study in SQLite" in message and "--workers" in message
    assert "(--output DIR)" in message and "--study-name" not in message
    assert sorted(p.name for p in run.iterdir()) == ["study.db"]
    monkeypatch.chdir(tmp_path)  # the default run directory: a new name is a new directory
    default = tmp_path / "an-runs" / "resnet10t-default"
    default.mkdir(parents=True)
    optuna.create_study(storage=f"sqlite:///{default / 'study.db'}", study_name="x")
    with pytest.raises(StorageError, match=r"\(--study-name NAME or --output DIR\)"):
        run_workers(SearchConfig("resnet10t"), 2)


@pytest.mark.parametrize(("omp", "threads"), [(None, 2), ("1", 1), ("8", 2), ("x", 2)])
def test_a_worker_keeps_to_the_users_omp_num_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, omp: str | None, threads: int
) -> None:
    """OMP_NUM_THREADS=1 caps every worker at one thread, as it caps one process's torch."""
    from an_search.search._procs import start_worker

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    (plan,) = plan_workers(1, cpus=[0, 1])
    proc = start_worker(SearchConfig("resnet10t"), plan, None, False, tmp_path)
    proc.kill()
    proc.wait()
    written = json.loads((tmp_path / "worker-0.json").read_text())
    assert written["train"]["threads"] == threads


def test_sync_bn_needs_gpus(tmp_path: Path) -> None:
    cfg = SearchConfig("resnet10t", output_dir=tmp_path / "runs")
    with pytest.raises(TrainConfigError, match="SyncBatchNorm needs CUDA"):
        run_workers(cfg, 1, gpus_per_trial=2, sync_bn=True)
    assert not (tmp_path / "runs").exists()  # refused before any folder is made


def test_batches_are_checked_per_trial_process_before_a_study_exists(
    tmp_path: Path, tiny_train
) -> None:
    """8000 training images: a batch of 4096 fits one process, not each of two ranks."""
    run = tmp_path / "runs"
    cfg = SearchConfig("resnet10t", output_dir=run, train=tiny_train(batch_size=4096))
    with pytest.raises(DataError, match="8000 training images .* 4096 on each of 2 processes"):
        run_workers(cfg, 1, gpus_per_trial=2)
    assert not run.exists()  # no study left to block the corrected command
    big = replace(cfg, train=tiny_train(batch_size=8001))
    with pytest.raises(DataError, match="8000 training images is less than one batch of 8001;"):
        run_search(big)
    assert not run.exists()


def test_budget_counts_a_retried_trial_once() -> None:
    study = optuna.create_study()
    for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL):
        study.add_trial(
            optuna.create_trial(state=state, value=1.0 if state.name == "COMPLETE" else None)
        )
    # trial 3 retries trial 1 (what RetryHeartbeatStaleTrialCallback writes); trial 2 failed
    # for its own reasons and counts.
    retry = {"failed_trial": 1, "retry_history": [1]}
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, system_attrs=retry))
    trials = study.get_trials()
    assert count_trials(trials) == 3 and count_trials(trials, waiting=False) == 2
    budget = SharedTrialBudget(3)
    assert not budget.reached(study)  # a trial still waits: run it first
    study.tell(study.ask(), 1.0)  # pops the WAITING retry
    assert budget.reached(study)
    assert not SharedTrialBudget(4).reached(study) and not SharedTrialBudget(None).reached(study)
    assert SharedTrialBudget(None, stop=lambda: True).reached(study)


def test_a_call_budget_counts_only_the_trials_its_workers_ran() -> None:
    study = optuna.create_study()

    def add(state: TrialState, call: str | None, **kw: object) -> None:
        attrs = {} if call is None else {"worker": {"host": "h", "pid": 1, "call": call}}
        value = 1.0 if state == TrialState.COMPLETE else None
        study.add_trial(optuna.create_trial(state=state, value=value, user_attrs=attrs, **kw))

    add(TrialState.COMPLETE, "a")
    add(TrialState.FAIL, "a")  # retried below by call b: counted once, for b
    add(TrialState.COMPLETE, "b")
    add(TrialState.COMPLETE, None)  # a plain run's trial
    add(TrialState.COMPLETE, "b", system_attrs={"failed_trial": 1, "retry_history": [1]})
    add(TrialState.WAITING, "a")  # queued, not yet anyone's
    trials = study.get_trials()
    assert count_trials(trials, call="a") == 1 and count_trials(trials, call="b") == 2
    assert count_trials(trials, call="c") == 0 and count_trials(trials) == 5
    assert SharedTrialBudget(1, call="a").reached(study)  # the queue does not hold it back
    assert not SharedTrialBudget(2, call="a").reached(study)
    assert not SharedTrialBudget(5).reached(study)  # the study's total: the queue holds it


def test_worker_n_trials_adds_its_own_while_other_processes_add_theirs(
    tmp_path: Path, tiny_train
) -> None:
    """`an-search worker --n-trials 3` on a study that others write to meanwhile."""
    from an_search.search import join_config
    from an_search.search.study import prepare_search

    journal = tmp_path / "study.log"
    cfg = SearchConfig(
        "resnet10t",
        space=_space(tmp_path),
        output_dir=tmp_path / "run",
        study_name="busy",
        storage=journal,
        train=tiny_train(**TRAIN),
    )
    prepare_search(cfg)  # the creator: settings stored, baselines queued, no trial run here
    others: list[int] = []

    def another_process_adds_trials(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not others:  # after this call's first trial, 4 trials from elsewhere
            for _ in range(4):
                study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.1))
            others.extend(t.number for t in study.get_trials(deepcopy=False)[-4:])

    joined = join_config(str(journal), "busy", output_dir=tmp_path / "w", n_trials=3)
    study = run_workers(joined, join=True, on_trial=another_process_adds_trials, poll_s=0.05)
    trials = study.get_trials()
    own = [t for t in trials if t.number not in others]
    assert len(others) == 4 and len(trials) == 7  # three of its own, whatever others added
    assert [t.user_attrs.get("baseline") for t in own[:2]] == ["bn", "paper"]
    assert {t.state for t in own} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"]["call"] for t in own}) == 1


def test_a_run_stops_at_its_total_when_a_worker_joined_it(tmp_path: Path, tiny_train) -> None:
    """`an-search run --n-trials 4` (no --workers) and an `an-search worker` that joined it: the
    total is shared, the run does not add its 4 on top of the worker's trials."""
    cfg = _tiny(
        tmp_path, tiny_train, study_name="joined", storage=tmp_path / "study.log", n_trials=4
    )
    others: list[int] = []

    def a_worker_adds_trials(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not others:  # after the run's first trial, 2 trials that a joined worker ran
            for _ in range(2):
                study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.1))
            others.extend(t.number for t in study.get_trials(deepcopy=False)[-2:])

    study = run_search(cfg, callbacks=[a_worker_adds_trials])
    trials = study.get_trials()
    assert study.user_attrs["target_trials"] == 4 and len(others) == 2
    assert len(trials) == 4  # the run's own: the two baselines (the queue is never left)
    assert [t.user_attrs.get("baseline") for t in trials if t.number not in others] == [
        "bn",
        "paper",
    ]


def test_a_sqlite_study_another_process_runs_is_not_joined(tmp_path: Path, tiny_train) -> None:
    """SQLite takes one writer: a worker (or a resume) on a study whose trial a live process
    is training is refused, and that trial is left RUNNING (not failed as stale)."""
    from an_search.search import join_config
    from an_search.search.storage import record_worker
    from an_search.search.study import prepare_search

    db = f"sqlite:///{tmp_path}/s.db"
    cfg = _tiny(tmp_path, tiny_train, study_name="busy", storage=db, n_trials=2)
    prepare_search(cfg)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        trial = open_study(db, "busy").ask()
        record_worker(trial)
        study = optuna.load_study(study_name="busy", storage=db)
        worker = {**trial.user_attrs["worker"], "pid": other.pid, "start": None}
        study._storage.set_trial_user_attr(trial._trial_id, "worker", worker)
        joined = join_config(db, "busy", output_dir=tmp_path / "w")
        with pytest.raises(StorageError, match=rf"trial 0 is RUNNING in process {other.pid} on"):
            run_workers(joined, join=True)
        with pytest.raises(StorageError, match="SQLite takes one writer: wait for that run"):
            run_search(cfg)
        assert study.get_trials()[0].state == TrialState.RUNNING
    finally:
        other.kill()
        other.wait()
    assert run_search(cfg).get_trials()[0].state == TrialState.FAIL  # its process is gone now
    # a run killed on another host (or in another container) cannot be proven alive from here:
    # its trial stays RUNNING, and the study resumes
    study = optuna.load_study(study_name="busy", storage=db)
    elsewhere = study.ask()
    elsewhere.set_user_attr("worker", {**worker, "host": worker["host"] + "-other"})
    elsewhere.set_user_attr("config_key", "training-there")  # (built: no twin waits for it)
    trials = run_search(cfg).get_trials()
    assert trials[elsewhere.number].state == TrialState.RUNNING
    assert trials[-1].state == TrialState.COMPLETE


def test_two_workers_share_a_journal_and_never_train_twice(tmp_path: Path, tiny_train) -> None:
    cfg = SearchConfig(
        "resnet10t",
        space=_space(tmp_path),
        output_dir=tmp_path / "run",
        study_name="shared",
        n_trials=6,
        train=tiny_train(**TRAIN),
    )
    finished: list[int] = []
    messages: list[str] = []
    study = run_workers(
        cfg, 2, on_trial=lambda s, t: finished.append(t.number), on_message=messages.append
    )
    journal = tmp_path / "run" / "study.log"
    assert journal.is_file() and any(str(journal) in m for m in messages)
    trials = open_study(tmp_path / "run").get_trials()  # the run directory finds the journal
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))) and 6 <= len(trials) <= 7  # <= workers - 1 over
    assert sorted(finished) == numbers  # the parent saw every trial finish, once
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["bn", "paper"]
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers ran trials, not the parent

    trained = [t for t in trials if t.user_attrs["steps"] > 0]
    keys = [t.user_attrs["config_key"] for t in trained]
    assert len(keys) == len(set(keys)) <= 4  # no configuration trained twice
    for t in trials:
        if t.user_attrs["steps"] == 0:
            origin = trials[t.user_attrs["duplicate_of"]]
            assert origin.user_attrs["config_key"] == t.user_attrs["config_key"]
            assert t.value == origin.value
    for i in (0, 1):  # each worker got one of the two cores and one torch thread
        spec = json.loads((tmp_path / "run" / "workers" / f"worker-{i}.json").read_text())
        assert spec["train"]["threads"] == 1 and spec["storage"] == str(journal)
    assert study.user_attrs["target_trials"] == 6


def test_ctrl_c_stops_all_workers_and_leaves_nothing_running(tmp_path: Path, tiny_train) -> None:
    """SIGINT to the parent process (this one; a thread sends it, as `kill -INT` would)."""
    run = tmp_path / "run"
    cfg = _cuttable(tmp_path, tiny_train, n_trials=40)
    running: list[int] = []

    def interrupt_when_both_train() -> None:
        running.extend(_wait_for_two_running_trials(run / "study.log", 180))
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt_when_both_train, daemon=True)
    sender.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_workers(cfg, 2, poll_s=0.2)
    sender.join(timeout=5)
    assert len(running) == 2
    trials = open_study(run / "study.log", "stop").get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len(trials) < 40 and time.monotonic() - start < 240
    for number in running:  # the trials cut by Ctrl-C ended FAIL (or finished just before)
        assert trials[number].state in (TrialState.FAIL, TrialState.COMPLETE)
    cut = [trials[n] for n in running if trials[n].state == TrialState.FAIL]
    assert cut and all("SIGINT" in t.user_attrs["fail_reason"] for t in cut)
    for pid in {t.user_attrs["worker"]["pid"] for t in trials if "worker" in t.user_attrs}:
        with pytest.raises(ProcessLookupError):  # every worker is gone
            os.kill(pid, 0)


def test_a_baseline_whose_worker_is_killed_runs_again_in_the_same_run(
    tmp_path: Path, tiny_train
) -> None:
    """`run --workers 2` whose worker training the BN baseline is SIGKILLed: the run queues the
    baseline again (the other worker trains it), and the dead trial does not take a place of
    the total."""
    run = tmp_path / "run"
    cfg = _cuttable(tmp_path, tiny_train, n_trials=4)
    killed: list[int] = []

    def kill_the_baselines_worker() -> None:
        # as soon as it trains (waiting for the other worker's trial too lost the race on a
        # loaded machine: the baseline of 18 updates had finished)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            trials = _stored_trials(run / "study.log")
            first = trials[0] if trials else None
            if first is not None and first.state.is_finished():
                return
            if first is not None and "config_key" in first.user_attrs:  # (built: training)
                killed.append(first.user_attrs["worker"]["pid"])
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_baselines_worker, daemon=True)
    killer.start()
    messages: list[str] = []
    study = run_workers(cfg, 2, poll_s=0.2, on_message=messages.append)
    killer.join(timeout=5)
    assert killed, "the baseline finished before it could be killed"
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "is gone" in trials[0].user_attrs["fail_reason"]
    again = [t for t in trials if t.user_attrs.get("requeued_from") == 0]
    assert len(again) == 1 and again[0].user_attrs["baseline"] == "bn"
    assert again[0].state == TrialState.COMPLETE
    assert again[0].user_attrs["worker"]["pid"] != killed[0]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 4 and count_trials(trials) == len(trials) - 1  # (Hyperband may
    # prune a sampled trial of 3 epochs)
    assert any("exited with code -9" in m for m in messages)


def _tiny(tmp_path: Path, tiny_train, **settings: Any) -> SearchConfig:
    """A search of the four-configuration space in tmp_path/run, trials of two updates."""
    return SearchConfig(
        "resnet10t", space=_space(tmp_path), output_dir=tmp_path / "run",
        train=tiny_train(**TRAIN), **settings,
    )  # fmt: skip


def _cuttable(tmp_path: Path, tiny_train, n_trials: int) -> SearchConfig:
    """Study "stop" in tmp_path/run, with trials long enough to cut while two workers train."""
    return SearchConfig(
        "resnet10t",
        space=_space(tmp_path),
        output_dir=tmp_path / "run",
        study_name="stop",
        n_trials=n_trials,
        train=tiny_train(epochs=3, batches_per_epoch=6),
    )


def _stored_trials(journal: Path) -> list[FrozenTrial]:
    """Study "stop"'s trials as stored now; none before the parent has created it."""
    try:
        return open_study(journal, "stop").get_trials(deepcopy=False)
    except StorageError:
        return []


def _wait_for_two_running_trials(journal: Path, limit_s: float) -> list[int]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        trials = _stored_trials(journal)
        if trials:
            running = [
                t.number
                for t in trials
                if t.state == TrialState.RUNNING and "config_key" in t.user_attrs
            ]
            if len(running) == 2:
                time.sleep(1.0)  # both are training now
                return running
        time.sleep(0.3)
    raise AssertionError(f"two workers never ran trials together within {limit_s} s")


BETWEEN_TRIALS = """
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from an_search.search import SearchConfig, run_search
from an_search.train import TrainConfig

def pause(study, trial):  # between two trials: no trial of the study is RUNNING
    Path(sys.argv[3]).write_text(str(trial.number))
    time.sleep(120)

run_search(SearchConfig("resnet10t", space=sys.argv[1], output_dir=sys.argv[2],
                        study_name="busy", n_trials=2, train=TrainConfig(**{train!r}),
                        storage=sys.argv[4]),
           callbacks=[pause])
"""


def test_a_sqlite_study_is_one_searchs_also_between_its_trials(tmp_path: Path, tiny_train) -> None:
    """A search holds its SQLite study from setup to its end: another search of it is refused
    while the first is between two trials (no RUNNING trial to see), and none of its trials is
    touched; another study of the same file stays free, and a killed search frees its own."""
    from dataclasses import asdict

    db = f"sqlite:///{tmp_path}/s.db"
    cfg = _tiny(tmp_path, tiny_train, study_name="busy", n_trials=1, storage=db)
    flag = tmp_path / "between"
    train = {k: v for k, v in asdict(tiny_train(**TRAIN)).items() if k != "device"}
    code = BETWEEN_TRIALS.format(train=train)
    args = [str(cfg.space), str(cfg.output_dir), str(flag), db]
    child = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child finished no trial in 120 s"
            time.sleep(0.2)
        with pytest.raises(StorageError, match="'busy' in sqlite:///.* is being run by another"):
            run_search(cfg)
        trials = optuna.load_study(study_name="busy", storage=db).get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.WAITING]
        other = replace(cfg, study_name="other", output_dir=tmp_path / "other")
        assert run_search(other).get_trials()[0].state == TrialState.COMPLETE
    finally:
        child.kill()
        child.wait()
    trials = run_search(cfg).get_trials()  # (the killed search's lock went with its process)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


def test_cli_bad_parallel_options_are_one_line_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.search import app

    runner, env = CliRunner(), {"NO_COLOR": "1", "COLUMNS": "200"}
    db = str(tmp_path / "s.db")
    res = runner.invoke(app, ["run", "resnet10t", "--workers", "2", "--storage", db], env=env)
    assert res.exit_code == 2 and "SQLite takes one writer" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 3  # one message (rich may wrap it)
    res = runner.invoke(
        app, ["run", "resnet10t", "--gpus", "0,x", "--output", str(tmp_path)], env=env
    )
    assert res.exit_code == 2 and "--gpus takes GPU ids" in res.stderr
    res = runner.invoke(app, ["worker", "--storage", str(tmp_path / "none.log")], env=env)
    assert res.exit_code == 2 and "storage" in res.stderr
    # refused input: the error alone, no note of a journal the workers would have shared
    out = str(tmp_path / "w")
    res = runner.invoke(app, ["run", "resnet10t", "--workers", "2", "--epochs", "0", "--output",
                              out], env=env)  # fmt: skip
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "epochs" in res.stderr
    assert "journal" not in res.stderr and not (tmp_path / "w").exists()


def test_the_parent_leaves_a_live_workers_new_trial_alone(tmp_path: Path) -> None:
    """A worker's trial is RUNNING before it records its worker (Optuna's ask, then the
    sampler); the parent watching a live worker on SQLite must not take that trial for a dead
    run's. (Before: it failed the trial, the worker's tell raised "Cannot tell a FAIL trial.",
    and a --workers 1 or --gpus-per-trial run ended with that error.)"""
    from an_search.search._procs import watch_workers

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    starting = study.ask()  # (no worker recorded yet)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    assert not watch_workers(study, [worker], set(), None, poll_s=0.05)
    assert worker.returncode == 0
    assert study.get_trials()[starting.number].state == TrialState.RUNNING
