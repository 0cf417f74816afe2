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


@contextmanager
def sqlite_writer_lock(url: str, study_name: str) -> Iterator[None]:
    """Hold study ``study_name``'s byte of ``FILE.lock`` beside the SQLite file of ``url`` for
    the block (other storages, or a file whose folder does not exist: nothing to hold).

    Raises:
        StorageError: another process holds it: a search of that study is running.
    """
    db = sqlite_file(url)
    if fcntl is None or db is None or not db.parent.is_dir():
        yield
        return
    lock = db.with_name(db.name + ".lock")
    offset = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:4], "big") >> 1
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # (a folder this process cannot write: the storage's own error says so)
        fd = None
    if fd is None:
        yield
        return
    try:
        if not _lock_byte(fd, offset):
            raise StorageError(
                f"study {study_name!r} in {hide_password(url)} is being run by another process "
                f"(it holds {lock}), and SQLite takes one writer: wait for that run to end, or "
                "share a study between processes through a journal file (--storage FILE.log) "
                "or a server database"
            )
        yield
    finally:
        os.close(fd)  # (drops the lock)


def _lock_byte(fd: int, offset: int) -> bool:
    """Lock byte ``offset`` of ``fd``: False if another process holds it (True also where the
    file system has no locks: the RUNNING-trial check remains)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EACCES)
    return True
