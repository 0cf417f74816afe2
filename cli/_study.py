"""Open the study a command names: a run directory, its study file, or ``--storage``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

#: A run directory's study file given in its place (SQLite, or the workers' journal).
STUDY_FILES = (".db", ".log", ".sqlite", ".sqlite3")


def open_run(
    run_dir: Path | None, storage: str | None, study_name: str | None
) -> tuple[optuna.Study, str, Path]:
    """The study of a run directory (or its study file) or ``--storage``; with its storage URL
    and the folder its outputs go to (the run directory; else the study's default one)."""
    from an_search.errors import StorageError
    from an_search.search import open_study, study_storage_url
    from an_search.search.config import default_run_dir

    source = storage or (str(run_dir) if run_dir is not None else os.environ.get("OPTUNA_STORAGE"))
    if source is None:
        raise StorageError("no study given: pass a run directory or --storage URL")
    if storage is None and run_dir is not None and not run_dir.exists():
        raise StorageError(
            f"no run directory {str(run_dir)!r}: pass the --output of an an-search run "
            "(an-runs/MODEL-SPACE by default, with -OBJECTIVES for several) or --storage"
        )
    study = open_study(source, study_name)
    where = run_dir if run_dir is not None else default_run_dir(study.study_name)
    if storage is None and run_dir is not None and run_dir.is_file():  # RUN/study.db given
        where = run_dir.parent
    return study, study_storage_url(source), where
