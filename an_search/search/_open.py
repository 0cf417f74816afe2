"""Open an existing study (reports, exports, workers joining it): a storage URL or file, or a
run directory, read without creating anything."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import optuna

from an_search.errors import StorageError

from ._lock import sqlite_file
from .storage import (
    DEFAULT_DB_NAME,
    DEFAULT_JOURNAL_NAME,
    hide_password,
    open_storage,
    resolve_storage_url,
)

__all__ = ["open_study", "study_storage_url"]


def study_storage_url(storage: str | Path) -> str:
    """The storage that :func:`open_study` reads ``storage`` as: a URL or journal file path.

    Raises:
        StorageError: a run directory without a study file, or a storage file that is missing.
    """
    path = Path(storage)
    if "://" not in str(storage) and path.is_dir():
        files = [path / n for n in (DEFAULT_DB_NAME, DEFAULT_JOURNAL_NAME) if (path / n).is_file()]
        if not files:
            raise StorageError(f"run directory holds no {DEFAULT_DB_NAME}: {path}")
        storage = files[0]
    url = resolve_storage_url(storage, ".")
    file = Path(url) if "://" not in url else sqlite_file(url)  # (a URL's ?query, %20 read)
    if file is not None:
        if not file.is_file():
            raise StorageError(f"storage file must exist to read a study: {file}")
        if "://" in url and not _has_optuna_tables(file):
            raise _no_study(storage)  # (before Optuna makes it a database)
    return url


def _no_study(storage: str | Path) -> StorageError:
    return StorageError(
        f"storage {hide_password(str(storage))!r} holds no study: give the storage of one that "
        "`an-search run` made"
    )


def _has_optuna_tables(file: Path) -> bool:
    """Whether a SQLite file holds Optuna's tables, read without writing: True for a file that
    is no database (:func:`open_storage` says what it is), False for an empty one."""
    try:
        with closing(sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'studies'").fetchone()
    except sqlite3.Error:
        return True
    return found is not None


def open_study(storage: str | Path, study_name: str | None = None) -> optuna.Study:
    """Load an existing study for reports: a storage URL/file, or a run directory.

    Args:
        storage: URL, journal or SQLite file, or a run directory holding ``study.db``
            (or ``study.log``).
        study_name: needed only when the storage holds several studies.

    Raises:
        StorageError: nothing to open, no such study, or several studies and no name.
    """
    backend = open_storage(study_storage_url(storage))
    names = optuna.get_all_study_names(backend)
    if not names:
        raise _no_study(storage)
    if study_name is None:
        if len(names) != 1:
            raise StorageError(
                f"storage holds {len(names)} studies, so a study name is needed (--study-name): "
                f"{', '.join(map(repr, names))}"
            )
        study_name = names[0]
    if study_name not in names:
        raise StorageError(
            f"no study of that name in the storage ({', '.join(map(repr, names))}): {study_name!r}"
        )
    return optuna.load_study(study_name=study_name, storage=backend)
