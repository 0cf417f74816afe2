"""Optuna storages: resolve what the user typed, open it, and fail trials a dead worker left.

Which storage (DESIGN point 9):

- nothing given: ``$OPTUNA_STORAGE`` if set, else a SQLite file ``study.db`` in the run directory
  (one worker: SQLite never has several writers), or its journal ``study.log`` when a run with
  several workers made one there;
- a path ending ``.log`` or ``.journal``: Optuna's ``JournalStorage(JournalFileBackend(path))``,
  for several worker processes on one machine;
- a path ending ``.db``, ``.sqlite`` or ``.sqlite3``: that SQLite file;
- any Optuna storage URL (``sqlite:///``, ``postgresql://``, ``mysql://``): ``RDBStorage``. Server
  databases get Optuna's heartbeat (``heartbeat_interval``, ``grace_period``), so a worker that
  dies on another machine has its trial marked FAIL by the next worker that starts a trial (or
  that waits for it, see ``Objective``), and re-queued once (:class:`RetryStaleTrial`, Optuna's
  ``RetryHeartbeatStaleTrialCallback``, once ``RetryFailedTrialCallback``).
  ``$AN_SEARCH_HEARTBEAT_INTERVAL`` and ``$AN_SEARCH_GRACE_PERIOD`` (seconds) override the
  defaults below.

Stale trials (the rule): every trial records its worker (host, pid, process start time) when it
starts. When a search starts, a RUNNING trial of the study is marked FAIL (user attribute
``fail_reason``) if its worker ran on this host and that process no longer exists, or, on SQLite
(one writer by design), if it recorded no worker at all; on a server database it is then
re-queued once, as the heartbeat would have done. RUNNING trials of live processes and of
other hosts are left alone: on a server database the heartbeat fails them. Finished trials are
never touched, so a killed search loses nothing but the trial it was running.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import socket
import warnings
from pathlib import Path

import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from an_search._process import PID_NAMESPACE, alive
from an_search._values import first_line
from an_search.errors import StorageError

__all__ = [
    "DEFAULT_DB_NAME",
    "DEFAULT_JOURNAL_NAME",
    "RetryStaleTrial",
    "check_sqlite_writer",
    "count_trials",
    "fail_dead_worker_trials",
    "heartbeat_enabled",
    "hide_password",
    "open_storage",
    "record_worker",
    "resolve_storage_url",
    "with_driver",
    "worker_gone",
]

DEFAULT_DB_NAME = "study.db"
DEFAULT_JOURNAL_NAME = "study.log"
_JOURNAL_SUFFIXES = (".log", ".journal")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_WORKER_KEY = "worker"
#: Heartbeat for server databases: beat every 30 s, a trial silent for 120 s is stale.
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
#: A dead worker's trial is re-queued this many times at most (then it stays FAIL).
HEARTBEAT_MAX_RETRY = 1
#: What a re-queued trial keeps: its configuration (params, and the baseline it is), and the
#: retry chain; not what the dead run recorded (fail_reason, worker, Hyperband's rungs...).
_REQUEUED_USER_ATTRS = ("baseline",)
_REQUEUED_SYSTEM_ATTRS = ("fixed_params", "failed_trial", "retry_history")


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a stale trial, re-queueing its configuration only.

    Optuna's callback copies every attribute of the dead trial into the retry: its
    ``fail_reason`` then showed on a retry that completed, and its Hyperband rungs (system
    attributes) counted as the retry's.
    """

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        kept = copy.deepcopy(trial)
        kept.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in _REQUEUED_USER_ATTRS}
        kept.system_attrs = {
            k: v for k, v in trial.system_attrs.items() if k in _REQUEUED_SYSTEM_ATTRS
        }
        super().__call__(study, kept)


def resolve_storage_url(storage: str | os.PathLike[str] | None, run_dir: str | Path) -> str:
    """Return the storage the user means, as a URL or a journal file path.

    Args:
        storage: URL, journal/SQLite path, or None (``$OPTUNA_STORAGE``, else the run directory's
            ``study.db``).
        run_dir: the run directory holding the default SQLite file.

    Returns:
        ``sqlite:///ABSOLUTE`` for SQLite files, the URL as given for other URLs, an absolute path
        for journal files.

    Raises:
        StorageError: SQLite in memory (a study that cannot be resumed), or no storage.
    """
    text = str(storage) if storage is not None else os.environ.get("OPTUNA_STORAGE") or None
    if text is None:
        db, journal = Path(run_dir) / DEFAULT_DB_NAME, Path(run_dir) / DEFAULT_JOURNAL_NAME
        if journal.is_file() and not db.exists():  # a run with several workers made it
            return str(journal.resolve())
        return f"sqlite:///{db.resolve()}"
    if "://" in text:
        if _in_memory(text):
            raise StorageError(
                f"storage {text!r} is in memory: the study would be gone when the run ends, "
                "unresumable; give a file, e.g. sqlite:///study.db"
            )
        return text
    path = Path(text).expanduser()
    if path.suffix in _JOURNAL_SUFFIXES:
        return str(path.resolve())
    if path.suffix in _SQLITE_SUFFIXES:
        return f"sqlite:///{path.resolve()}"
    raise StorageError(
        "storage must be an Optuna URL (sqlite:///, postgresql://...), a journal file (.log, "
        f".journal) or a SQLite file (.db): {text!r}"
    )


def _in_memory(url: str) -> bool:
    """Whether ``url`` is SQLite in memory (``sqlite://``, ``sqlite:///:memory:``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return False  # (open_storage says what is wrong with it)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def open_storage(url: str) -> BaseStorage:
    """Open a storage resolved by :func:`resolve_storage_url`.

    Raises:
        StorageError: the file, directory, server or driver is unusable (one line, with the fix).
    """
    interval = _env_seconds("AN_SEARCH_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL_S)
    grace = _env_seconds("AN_SEARCH_GRACE_PERIOD", HEARTBEAT_GRACE_S)
    try:
        if "://" not in url:
            _check_journal(Path(url))
            return JournalStorage(JournalFileBackend(url))
        if url.startswith("sqlite"):
            return RDBStorage(url)
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                with_driver(url),
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=HEARTBEAT_MAX_RETRY),
            )
    except ImportError as exc:
        raise StorageError(
            f"storage {hide_password(url)!r} needs a database driver that is not installed "
            f"(pip install 'an-search[postgres]' for PostgreSQL): {first_line(exc)}"
        ) from None
    except Exception as exc:  # sqlalchemy, OSError, corrupt files: all mean "cannot open"
        raise StorageError(
            f"storage {hide_password(url)!r} cannot be opened (check the path, its directory, "
            f"the server and the credentials): {first_line(exc)}"
        ) from None


def hide_password(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (for messages): the
    one before the host (``user:PASSWORD@``) and a libpq ``password=`` query parameter."""
    text = re.sub(r"(://[^/:@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(://\S*?[?&]password=)[^&\s]*", r"\1***", text, flags=re.IGNORECASE)


def _check_journal(path: Path) -> None:
    """Raise unless ``path`` is missing, empty or starts with an Optuna journal record.

    Optuna reads a journal only when it syncs, after its first write, and takes a last line it
    cannot parse for a write in progress: another file would gain a record, then fail."""
    try:
        with path.open("rb") as f:
            first = f.readline()
    except FileNotFoundError:
        return
    if not first:
        return
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise ValueError("not an Optuna journal file (its first line is no journal record)")


def record_worker(trial: optuna.trial.Trial, call: str | None = None) -> None:
    """Record this process as the worker of ``trial`` (read by :func:`fail_dead_worker_trials`).

    ``call``: the id of the worker call this process belongs to, counted by
    :func:`count_trials` (``an-search worker --n-trials``: the trials this call adds).
    """
    worker = _this_worker()
    if call is not None:
        worker["call"] = call
    trial.set_user_attr(_WORKER_KEY, worker)


def fail_dead_worker_trials(study: optuna.Study, *, unowned: bool = True) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker died (the rule in the module docstring).

    Args:
        study: the study.
        unowned: on SQLite, also fail RUNNING trials that recorded no worker (False: only
            trials whose recorded worker is gone, as while other trials may be starting).

    Returns:
        The numbers of the trials marked FAIL.
    """
    rdb = _rdb(study)
    sqlite = unowned and isinstance(rdb, RDBStorage) and rdb.url.startswith("sqlite")
    retry = None  # the heartbeat's retry callback, on server databases
    if heartbeat_enabled(study):
        retry = study._storage.get_heartbeat_stale_trial_callback()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(_WORKER_KEY)
        if worker is None and sqlite:
            reason = "the search that ran it stopped before the trial recorded its worker"
        else:
            reason = worker_gone(trial)
        if reason is None:
            continue
        # Optuna has no public call to annotate another process's trial: use its storage API,
        # as its own fail_stale_trials does; of several workers that find the same dead trial,
        # the one whose state change lands fails it (and queues its one retry)
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        failed.append(trial.number)
        if retry is not None:  # re-queued once, as the heartbeat would have done
            retry(study, study._storage.get_trial(trial._trial_id))
    return failed


def check_sqlite_writer(study: optuna.Study) -> None:
    """Refuse a SQLite study that another live process of this host is running (a RUNNING
    trial whose recorded worker is alive): SQLite takes one writer at a time. A worker on
    another host, or in another PID namespace, cannot be proven alive: such a trial stays
    RUNNING, and the study is taken (a run killed there is resumed here).

    Raises:
        StorageError: naming the trial, its process, and the storages several processes share.
    """
    rdb = _rdb(study)
    if not (isinstance(rdb, RDBStorage) and rdb.url.startswith("sqlite")):
        return
    me = _this_worker()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(_WORKER_KEY)
        if not isinstance(worker, dict) or worker_gone(trial) is not None:
            continue  # (no worker recorded: stale on SQLite, failed as such)
        if worker.get("host") != me["host"] or worker.get("ns", PID_NAMESPACE) != PID_NAMESPACE:
            continue  # (its liveness is unknown here)
        if worker.get("pid") == me["pid"]:
            continue
        raise StorageError(
            f"study {study.study_name!r} in {hide_password(rdb.url)} is being run: trial "
            f"{trial.number} is RUNNING in process {worker.get('pid')} on {worker.get('host')}, "
            "and SQLite takes one writer: wait for that run to end, or share a study between "
            "processes through a journal file (--storage FILE.log) or a server database"
        )


def worker_gone(trial: FrozenTrial) -> str | None:
    """Why ``trial``'s recorded worker is known to be gone (a dead process on this host), or
    None (alive, elsewhere, or none recorded)."""
    worker = trial.user_attrs.get(_WORKER_KEY)
    if not isinstance(worker, dict) or not _is_dead(worker):
        return None
    return f"its worker process {worker['pid']} on {worker['host']} is gone (killed)"


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage runs Optuna's heartbeat (server databases, see above)."""
    interval = getattr(study._storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


def with_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; the ``postgres`` extra installs
    psycopg2 (``psycopg2-binary``), so name it when psycopg 3 is absent.
    """
    if not url.startswith("postgresql://") or importlib.util.find_spec("psycopg") is not None:
        return url
    if importlib.util.find_spec("psycopg2") is None:
        return url  # SQLAlchemy's ImportError says what is missing
    return "postgresql+psycopg2://" + url.removeprefix("postgresql://")


def _env_seconds(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise StorageError(f"${name} must be a whole number of seconds >= 1: {text!r}")
    return int(text)


def _rdb(study: optuna.Study) -> BaseStorage:
    storage = study._storage
    return getattr(storage, "_backend", storage)  # _CachedStorage wraps RDBStorage


def _this_worker() -> dict[str, object]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": _start_time(pid),
        "ns": PID_NAMESPACE,
    }


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart); None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 counted from the state, after "comm)"


def _is_dead(worker: dict[str, object]) -> bool:
    if (
        worker.get("host") != socket.gethostname()
        or worker.get("ns", PID_NAMESPACE) != PID_NAMESPACE
    ):
        return False  # (another machine, or another PID namespace: its ids are not ours)
    pid = int(worker["pid"])  # type: ignore[call-overload]
    if worker.get("start") is not None:
        return _start_time(pid) != worker["start"]
    return not alive(pid)


def count_trials(
    trials: list[FrozenTrial], *, waiting: bool = True, call: str | None = None
) -> int:
    """Trials that count against a shared budget: all but FAIL trials that were re-queued.

    A trial failed by the heartbeat and retried (its number in a retry's ``retry_history``), or
    a failed baseline queued again (its number a run's ``requeued_from``), is counted once,
    through its retry. ``waiting=False`` leaves out WAITING trials too; ``call``
    counts only the trials that workers of that call ran (:func:`record_worker`), never WAITING.
    """
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    retried |= {t.user_attrs["requeued_from"] for t in trials if "requeued_from" in t.user_attrs}
    return sum(
        1
        for t in trials
        if not (t.state == TrialState.FAIL and t.number in retried)
        and (waiting or t.state != TrialState.WAITING)
        and (call is None or _worker_call(t) == call and t.state != TrialState.WAITING)
    )


def _worker_call(trial: FrozenTrial) -> str | None:
    worker = trial.user_attrs.get(_WORKER_KEY)
    return worker.get("call") if isinstance(worker, dict) else None
