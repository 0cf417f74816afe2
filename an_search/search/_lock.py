"""One writer for a SQLite study: a lock file beside the database, held while a search runs.

SQLite takes one writer, so a second search on the same file is refused. Looking for a RUNNING
trial (``storage.check_sqlite_writer``) cannot see a search that is still setting up, or that
is between two trials, and two searches of a new study that start together both create its
tables (one then fails on Optuna's schema table). A lock closes that: one byte of ``FILE.lock``
per study (``fcntl.lockf``, at an offset drawn from the study's name, so that the other studies
of a shared file stay free). The operating system drops it when its process ends, so a killed
search never leaves a stale lock. Where ``fcntl`` is missing (Windows), nothing is locked.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from an_search.errors import StorageError

from .storage import hide_password

try:
    import fcntl
except ImportError:  # (Windows)
    fcntl = None  # type: ignore[assignment]

__all__ = ["sqlite_file", "sqlite_writer_lock"]


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None: another storage, or SQLite in memory)."""
    if "://" not in url:
        return None  # (a journal file: several writers by design)
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # (opening the storage says what is wrong with it)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


# Lock files this process holds: POSIX locks belong to the process, and closing any of its
# descriptors of a file drops them all, so each file is opened once (path -> pid, fd, studies)
_HELD: dict[str, tuple[int, int, set[str]]] = {}
_GUARD = threading.Lock()


@contextmanager
def sqlite_writer_lock(url: str, study_name: str) -> Iterator[None]:
    """Hold study ``study_name``'s byte of ``FILE.lock`` beside the SQLite file of ``url`` for
    the block (other storages, or a file whose folder does not exist: nothing to hold).

    Raises:
        StorageError: another process, or another search of this one, holds it.
    """
    db = sqlite_file(url)
    if fcntl is None or db is None or not db.parent.is_dir():
        yield
        return
    lock = os.path.realpath(db.with_name(db.name + ".lock"))
    offset = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:4], "big") >> 1
    with _GUARD:
        entry = _HELD.get(lock)
        if entry is not None and entry[0] != os.getpid():  # (a forked child's copy)
            entry = None
        if entry is None:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # (a folder this process cannot write: the storage's error says so)
                fd = None
            if fd is not None:
                entry = _HELD[lock] = (os.getpid(), fd, set())
        if entry is not None and (study_name in entry[2] or not _lock_byte(entry[1], offset)):
            if not entry[2]:
                os.close(entry[1])
                del _HELD[lock]
            raise StorageError(
                f"study {study_name!r} in {hide_password(url)} is being run by another search "
                f"(it holds {lock}), and SQLite takes one writer: wait for that run to end, or "
                "share a study between processes through a journal file (--storage FILE.log) "
                "or a server database"
            )
        if entry is not None:
            entry[2].add(study_name)
    try:
        yield
    finally:
        if entry is not None:
            with _GUARD:
                entry[2].discard(study_name)
                fcntl.lockf(entry[1], fcntl.LOCK_UN, 1, offset)
                if not entry[2]:
                    os.close(entry[1])  # (this process's last search of the file)
                    _HELD.pop(lock, None)


def _lock_byte(fd: int, offset: int) -> bool:
    """Lock byte ``offset`` of ``fd``: False if another process holds it (True also where the
    file system has no locks: the RUNNING-trial check remains)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EACCES)
    return True
