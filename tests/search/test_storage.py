"""Storages: what the user typed -> URL, unopenable storages, and dead workers' RUNNING trials."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from an_search.errors import StorageError
from an_search.search import fail_dead_worker_trials, open_storage, resolve_storage_url
from an_search.search.storage import hide_password


def test_resolve_storage_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    run = tmp_path / "run"
    assert resolve_storage_url(None, run) == f"sqlite:///{run.resolve()}/study.db"
    assert resolve_storage_url("postgresql://u@h/db", run) == "postgresql://u@h/db"
    assert resolve_storage_url(tmp_path / "j.log", run) == str(tmp_path / "j.log")
    assert resolve_storage_url(str(tmp_path / "j.journal"), run).endswith("j.journal")
    assert resolve_storage_url(tmp_path / "s.db", run) == f"sqlite:///{tmp_path}/s.db"
    monkeypatch.setenv("OPTUNA_STORAGE", "sqlite:///from-env.db")
    assert resolve_storage_url(None, run) == "sqlite:///from-env.db"
    assert resolve_storage_url("sqlite:///given.db", run) == "sqlite:///given.db"
    with pytest.raises(StorageError, match="journal file"):
        resolve_storage_url("results.txt", run)


def test_open_storage_kinds(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path / "j.log")), JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path}/s.db"), RDBStorage)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("sqlite:////nonexistent-dir/x/study.db", "cannot be opened"),
        ("/nonexistent-dir/x/study.log", "cannot be opened"),
        ("postgresql://user@127.0.0.1:1/db", "postgres"),
        ("nosuchdialect://x/y", "cannot be opened"),
    ],
)
def test_unopenable_storage_is_one_line(url: str, needle: str) -> None:
    with pytest.raises(StorageError) as info:
        open_storage(url)
    message = str(info.value)
    assert "\n" not in message and needle in message and url in message


def test_a_server_password_is_not_printed_in_storage_errors() -> None:
    url = "postgresql://alice:s3cr%40t-pw@127.0.0.1:1/an_search"
    with pytest.raises(StorageError) as info:
        open_storage(url)
    message = str(info.value)
    assert "s3cr" not in message and "postgresql://alice:***@127.0.0.1:1/an_search" in message
    assert hide_password("mysql://u:p@h/db and sqlite:////a:b/c.db") == (
        "mysql://u:***@h/db and sqlite:////a:b/c.db"
    )


def test_a_query_string_password_is_not_printed_in_storage_errors() -> None:
    url = "postgresql://alice@127.0.0.1:1/an_search?sslmode=disable&password=s3cr3t-pw"
    with pytest.raises(StorageError) as info:
        open_storage(url)
    message = str(info.value)
    assert "s3cr3t" not in message
    assert "an_search?sslmode=disable&password=***" in message
    assert hide_password("x postgresql://h/db?PASSWORD=a&user=b y") == (
        "x postgresql://h/db?PASSWORD=***&user=b y"
    )


def test_corrupt_sqlite_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="cannot be opened"):
        open_storage(f"sqlite:///{bad}")


@pytest.mark.parametrize("content", [b"garbage, not json\n", b'["json", "but no record"]\n'])
def test_a_file_that_is_no_journal_is_refused_and_left_as_it_was(
    content: bytes, tmp_path: Path
) -> None:
    bad = tmp_path / "notes.log"
    bad.write_bytes(content)
    with pytest.raises(StorageError, match="cannot be opened.*not an Optuna journal"):
        optuna.create_study(storage=open_storage(str(bad)), study_name="s")
    assert bad.read_bytes() == content  # nothing appended to the user's file
    good = tmp_path / "study.log"
    optuna.create_study(storage=open_storage(str(good)), study_name="s")
    assert optuna.get_all_study_names(open_storage(str(good))) == ["s"]
    (tmp_path / "empty.log").touch()
    assert isinstance(open_storage(str(tmp_path / "empty.log")), JournalStorage)


def _running(study: optuna.Study, worker: dict | None) -> int:
    trial = study.ask()
    if worker is not None:
        trial.set_user_attr("worker", worker)
    return trial.number


def test_dead_workers_trials_fail_live_ones_stay(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(storage=storage, study_name="s")
    done = study.ask()
    study.tell(done, 1.0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = _running(study, {"host": host, "pid": gone.pid, "start": "0"})
    alive = _running(study, {"host": host, "pid": os.getpid(), "start": None})  # kill(pid, 0)
    elsewhere = _running(study, {"host": host + "-other", "pid": 1, "start": None})
    anonymous = _running(study, None)  # SQLite: one writer, so an unowned RUNNING trial is stale

    assert sorted(fail_dead_worker_trials(study)) == [dead, anonymous]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {
        done.number: TrialState.COMPLETE,
        dead: TrialState.FAIL,
        alive: TrialState.RUNNING,
        elsewhere: TrialState.RUNNING,
        anonymous: TrialState.FAIL,
    }
    reason = study.get_trials()[dead].user_attrs["fail_reason"]
    assert str(gone.pid) in reason and "gone" in reason
    assert study.get_trials()[done.number].value == 1.0  # finished trials untouched


def test_journal_keeps_unowned_running_trials(tmp_path: Path) -> None:
    """Several processes may share a journal: only a provably dead worker's trial fails."""
    study = optuna.create_study(storage=open_storage(str(tmp_path / "j.log")), study_name="j")
    anonymous = _running(study, None)
    assert fail_dead_worker_trials(study) == []
    assert study.get_trials()[anonymous].state == TrialState.RUNNING


def test_resuming_a_journal_study_appends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume, refused or not, leaves the journal as it was: Optuna's
    ``create_study(load_if_exists=True)`` would append a second "create study" record."""
    from an_search.errors import StorageError as Refused
    from an_search.search import SearchConfig, create_or_load_study

    monkeypatch.chdir(tmp_path)
    journal = tmp_path / "study.log"
    first, _ = create_or_load_study(SearchConfig("resnet10t", storage=str(journal)))
    written = journal.read_bytes()
    again, _ = create_or_load_study(SearchConfig("resnet10t", storage=str(journal)))
    assert again.study_name == first.study_name and journal.read_bytes() == written
    other = SearchConfig("resnet18", storage=str(journal), study_name=first.study_name)
    with pytest.raises(Refused):  # another model under the same name
        create_or_load_study(other)
    assert journal.read_bytes() == written
    creates = [line for line in written.decode().splitlines() if '"op_code":0,' in line]
    assert len(creates) == 1  # (op code 0: create study)


def test_a_study_another_tool_made_is_not_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Optuna study of the same name that an-search did not make: one with trials, or one
    that minimizes (``optuna create-study``'s default), is refused; an empty maximizing one is
    taken, and gets the search's settings."""
    from an_search.search import SearchConfig, create_or_load_study

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/s.db"
    theirs = optuna.create_study(storage=url, study_name="theirs", direction="maximize")
    theirs.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    optuna.create_study(storage=url, study_name="empty-min")
    optuna.create_study(storage=url, study_name="empty-max", direction="maximize")
    with pytest.raises(StorageError, match="'theirs' holds 2 trials but no an-search settings"):
        create_or_load_study(SearchConfig("resnet10t", storage=url, study_name="theirs"))
    with pytest.raises(StorageError, match="made to minimize, this search maximizes top1"):
        create_or_load_study(SearchConfig("resnet10t", storage=url, study_name="empty-min"))
    two = SearchConfig("resnet10t", storage=url, study_name="empty-max", objectives="top1,macs")
    with pytest.raises(StorageError, match="to maximize, this search maximizes top1, minimizes"):
        create_or_load_study(two)
    assert [len(optuna.load_study(study_name=n, storage=url).trials) for n in ("theirs",)] == [2]
    taken, _ = create_or_load_study(SearchConfig("resnet10t", storage=url, study_name="empty-max"))
    assert taken.user_attrs["model"] == "resnet10t"
    assert [t.user_attrs["baseline"] for t in taken.trials] == ["bn", "paper"]
    # a creator killed between its settings' writes: taken, its settings written whole
    half = optuna.create_study(storage=url, study_name="half", direction="maximize")
    half.set_user_attr("model", "resnet10t")  # (no "objectives" yet: once a KeyError)
    whole, _ = create_or_load_study(SearchConfig("resnet10t", storage=url, study_name="half"))
    assert whole.user_attrs["objectives"] == ["top1"] and len(whole.trials) == 2


def test_a_resume_from_other_weights_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study stores its checkpoint's content (SHA-256), not its path: the same file under
    another name resumes; other weights, or none, are refused (their trials do not compare)."""
    import hashlib
    import shutil

    import timm
    import torch

    from an_search.search import SearchConfig, create_or_load_study

    monkeypatch.chdir(tmp_path)
    first, other = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), first)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), other)
    moved = tmp_path / "elsewhere" / "copy.pth"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    url = f"sqlite:///{tmp_path}/s.db"
    study, _ = create_or_load_study(SearchConfig("resnet10t", storage=url, checkpoint=first))
    stored = study.user_attrs["weights"]
    assert stored["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert stored["bytes"] == first.stat().st_size
    create_or_load_study(SearchConfig("resnet10t", storage=url, checkpoint=moved))
    with pytest.raises(
        StorageError, match=r"starts its trials from 'a.pth' \(sha256 .*this call from 'b.pth'"
    ):
        create_or_load_study(SearchConfig("resnet10t", storage=url, checkpoint=other))
    with pytest.raises(StorageError, match="this call from random init"):
        create_or_load_study(SearchConfig("resnet10t", storage=url))
    plain = SearchConfig("resnet10t", storage=url, study_name="plain")
    assert create_or_load_study(plain)[0].user_attrs["weights"] is None
    with pytest.raises(StorageError, match="from random init .*this call from 'a.pth'"):
        create_or_load_study(
            SearchConfig("resnet10t", storage=url, study_name="plain", checkpoint=first)
        )


def test_a_worker_gives_the_weights_path_on_its_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`an-search worker --checkpoint PATH`: the creator's path is not on this machine; the
    same file elsewhere joins (its content is what the study checks)."""
    import shutil

    import timm
    import torch

    from an_search.errors import CheckpointError
    from an_search.search import SearchConfig, create_or_load_study, join_config

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "creator" / "w.pth"
    weights.parent.mkdir()
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), weights)
    journal = tmp_path / "study.log"
    study, _ = create_or_load_study(
        SearchConfig("resnet10t", storage=str(journal), checkpoint=weights)
    )
    study.tell(study.ask(), 50.0)
    here = tmp_path / "worker" / "copy.pth"
    here.parent.mkdir()
    shutil.move(weights, here)
    with pytest.raises(
        CheckpointError, match="are not on this machine: give their path here with --checkpoint"
    ):
        join_config(str(journal))
    cfg = join_config(str(journal), checkpoint=here, output_dir=tmp_path / "w")
    assert cfg.checkpoint == here
    assert create_or_load_study(cfg)[0].study_name == study.study_name


def test_the_report_says_what_becomes_of_a_dead_workers_trial(tmp_path: Path) -> None:
    """On a journal a sampled trial is failed and not retried (Optuna retries on a server
    database only), a baseline is queued again: the report's reason says which."""
    from an_search.search import study_table

    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.log")), study_name="s")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = {"host": socket.gethostname(), "pid": gone.pid, "start": "0"}
    sampled = _running(study, worker)
    baseline = study.ask()
    baseline.set_user_attr("worker", worker)
    baseline.set_user_attr("baseline", "bn")
    reasons = {row["number"]: row["reason"] for row in study_table(study)}
    assert reasons[sampled].endswith("fails it (trials are re-queued on a server database only)")
    assert reasons[baseline.number].endswith("fails it and queues the baseline again")
    assert all(f"process {gone.pid} " in reason for reason in reasons.values())


@pytest.mark.parametrize("name", ["empty.log", "empty.db"])
def test_an_empty_storage_says_it_holds_no_study(tmp_path: Path, name: str) -> None:
    from an_search.search import open_study

    (tmp_path / name).touch()
    with pytest.raises(StorageError, match=rf"storage '.*{name}' holds no study: give the"):
        open_study(tmp_path / name)
    assert (tmp_path / name).stat().st_size == 0  # read, not made a database


def test_a_file_that_is_no_database_is_not_told_it_holds_no_study(tmp_path: Path) -> None:
    from an_search.search import open_study

    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    with pytest.raises(StorageError, match="cannot be opened .*: .*not a database"):
        open_study(tmp_path / "notes.db")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_a_storage_in_memory_is_refused(url: str, tmp_path: Path, tiny_train) -> None:
    """(Before: the search ran, wrote its reports, and the study was gone: report, export and
    a resume found no study.)"""
    from an_search.errors import StorageError
    from an_search.search import SearchConfig, run_search

    with pytest.raises(StorageError, match=r"is in memory: the study would be gone when the run"):
        run_search(
            SearchConfig(
                "resnet10t",
                storage=url,
                output_dir=tmp_path / "run",
                n_trials=1,
                train=tiny_train(epochs=1, batches_per_epoch=1),
            )
        )
    assert not (tmp_path / "run").exists()


def test_a_sqlite_url_with_a_query_or_escapes_is_read_as_it_was_written(tmp_path: Path) -> None:
    """``report``/``export``/``retrain``/``worker`` open the study a ``run`` made at the same
    URL: its file is SQLAlchemy's reading of it (``?timeout=10`` a query, ``%20`` a space),
    not the text after ``sqlite:///`` (before: "storage file must exist")."""
    from an_search.search import open_study

    (tmp_path / "sub dir").mkdir()
    url = f"sqlite:///{tmp_path}/sub%20dir/q.db?timeout=10"
    optuna.create_study(storage=url, study_name="s").enqueue_trial({"x": 1})
    assert (tmp_path / "sub dir" / "q.db").is_file()
    study = open_study(url, "s")
    assert study.study_name == "s" and len(study.get_trials()) == 1
    with pytest.raises(StorageError, match="storage file must exist to read a study: .*none.db"):
        open_study(f"sqlite:///{tmp_path}/none.db?timeout=10", "s")


PROBE = """
import fcntl, hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
offset = int.from_bytes(hashlib.sha256(sys.argv[2].encode()).digest()[:4], "big") >> 1
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
    print("taken")
except OSError:
    print("refused")
"""  # (a study's byte of the lock file, locked as another process would: no torch import)


def test_a_study_lock_holds_while_its_process_takes_and_drops_others(tmp_path: Path) -> None:
    """POSIX locks belong to the process, and closing any descriptor of the file drops them
    all: a second search in the same process (another study, or the same one again) must not
    free the first's study for other processes."""
    from an_search.search._lock import sqlite_writer_lock

    url = f"sqlite:///{tmp_path}/s.db"

    def probe(study: str) -> str:
        args = [sys.executable, "-c", PROBE, f"{tmp_path}/s.db.lock", study]
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()

    with sqlite_writer_lock(url, "A"):
        with sqlite_writer_lock(url, "B"):
            assert probe("B") == "refused" and probe("C") == "taken"
        with pytest.raises(StorageError, match="'A' in sqlite:.* is being run by another search"):
            with sqlite_writer_lock(url, "A"):
                pass
        assert probe("A") == "refused" and probe("B") == "taken"
    assert probe("A") == "taken"
