"""A git revision's ``an_search`` package, importable beside this tree's as ``an_search_base``.

For side-by-side measurements of Python-side changes in one process (the machines here are
too noisy for before/after runs in separate processes): ``git archive`` of the revision's
``an_search/`` into a temporary folder, renamed, its absolute imports of ``an_search``
rewritten to the new name (relative imports need nothing). Its C kernels build from its own
sources on first use, as this tree's do.
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BASE_PACKAGE = "an_search_base"
_ABSOLUTE = re.compile(r"\ban_search(?=[.\"':])")  # (':': the custom ops' namespace)


def import_base(rev: str, workdir: Path) -> ModuleType:
    """``an_search`` of git revision ``rev`` as :data:`BASE_PACKAGE`, unpacked in ``workdir``
    (which must outlive its use)."""
    archived = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "an_search"], capture_output=True
    )
    if archived.returncode:
        raise SystemExit(f"--base {rev}: {archived.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archived.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # (Python 3.11.4 on: no links out, no devices)
            tar.extractall(workdir, filter="data")
        else:  # pragma: no cover
            tar.extractall(workdir)  # noqa: S202  (our own repository's archive)
    package = workdir / BASE_PACKAGE
    (workdir / "an_search").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(_ABSOLUTE.sub(BASE_PACKAGE, path.read_text()))
    sys.path.insert(0, str(workdir))
    return importlib.import_module(BASE_PACKAGE)
