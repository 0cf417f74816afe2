"""Atomic file replacement: write a temporary file beside the target, then rename it over.

A crash or an error leaves either the old file or the new one, never half of one, and no
temporary behind. Used for saved models, checkpoints, reports and the built C kernels. A
temporary that a killed process left (SIGKILL, the OOM killer: no cleanup runs) is deleted by
the next write of the same target: temporaries are named after their host, PID namespace and
process, so only those of processes gone from this host are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._process import PID_NAMESPACE, alive

__all__ = ["replacing", "restored_on_error"]


@contextmanager
def replacing(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    The temporary lives in a folder of its own (``.NAME.HOST-PIDNS-PID.XXXX.tmp``), so that a
    writer's own temporaries (safetensors writes one and renames it) are swept with it. On any
    exception (including KeyboardInterrupt) the folder is deleted and ``path`` is untouched.
    The new file keeps the replaced file's permissions, or gets ``0o666`` less the umask, as
    ``open(path, "w")`` would. Raises OSError when the directory cannot be written.
    """
    path = Path(path)
    folder = _temp_folder(path, suffix)
    tmp = folder / path.name
    try:
        yield str(tmp)
        os.chmod(tmp, _mode(path))  # what open() would have given
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def restored_on_error(path: str | os.PathLike[str]) -> Iterator[None]:
    """On an error in the block, put ``path`` back as it was before it: the old file (kept as a
    hard link in a temporary folder, swept as ``replacing``'s are), or no file if there was
    none. For files replaced as a pair, so that one renamed without the other is undone."""
    path = Path(path)
    keep = _temp_folder(path, ".tmp")
    try:
        existed, backup = path.exists(), keep / path.name
        try:
            os.link(path, backup)
        except OSError:  # (none, or no hard links on this filesystem)
            backup = None
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, path)
                elif not existed:
                    path.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def _temp_folder(path: Path, suffix: str) -> Path:
    """A new folder beside ``path`` for its temporaries (``.NAME.HOST-PIDNS-PID.XXXX<suffix>``),
    after deleting those that processes gone from this host left."""
    ours = f".{path.name}.{_OWNER}"
    if os.name != "nt":  # (there, os.kill(pid, 0) would send a Ctrl-C event)
        _sweep(path.parent, ours, suffix)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{ours}{os.getpid()}.", suffix=suffix))


def _owner() -> str:
    """This host and PID namespace (containers sharing a hostname and a volume have their own
    process ids): ``HOST-NS-``; a temporary's process id is only compared within both."""
    return f"{socket.gethostname()}-{PID_NAMESPACE or 0}-"


_OWNER = _owner()


def _sweep(directory: Path, prefix: str, suffix: str) -> None:
    """Delete the temporaries ``prefix<pid>.*<suffix>`` in ``directory`` whose process is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return  # (mkdtemp says why the directory cannot be used)
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            stale = directory / name
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:  # (a temporary file, as written before they had folders)
                with contextlib.suppress(OSError):  # (another process swept it first)
                    stale.unlink()


def _mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it, since setting it to read it is not thread-safe
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
