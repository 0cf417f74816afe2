"""``replacing``: the new file appears whole or not at all, and no temporary is left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from an_search._atomic import replacing


def test_success_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with replacing(target) as tmp:
        Path(tmp).write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_error_keeps_the_old_file_and_no_temporary(tmp_path: Path, error: type) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(error), replacing(target) as tmp:
        Path(tmp).write_text("half")
        raise error()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_are_what_open_would_give(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with replacing(tmp_path / "new.txt") as tmp:
            Path(tmp).write_text("x")
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: a file open() creates
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "new.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask


def test_replacing_keeps_the_replaced_files_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o640)
    with replacing(target) as tmp:
        Path(tmp).write_text("new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == "new"


_WRITER = """
import sys, time
from pathlib import Path
from an_search._atomic import replacing
with replacing(sys.argv[1]) as tmp:
    Path(tmp).write_text("half")
    (Path(tmp).parent / ".tmpAbC123").write_text("a writer's own temporary (safetensors')")
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_temporary_is_swept_by_the_next_write(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the temporary (with what the writer put beside it, as
    safetensors does) stays until the next write of that target, which deletes it; a live
    writer's temporary, and one from another host, are left alone."""
    import signal
    import socket
    import subprocess
    import sys

    target = tmp_path / "model.safetensors"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    temps = [Path(w.stdout.readline().strip()).parent for w in writers]  # type: ignore[union-attr]
    killed, alive = writers
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    elsewhere = tmp_path / f".model.safetensors.{socket.gethostname()}x-0-{killed.pid}.abc.tmp"
    elsewhere.write_text("another host's")
    assert (temps[0] / ".tmpAbC123").is_file() and temps[0].name.startswith(".model.safetensors.")
    try:
        with replacing(target) as tmp:
            Path(tmp).write_text("whole")
        assert target.read_text() == "whole"
        assert not temps[0].exists() and (temps[1] / ".tmpAbC123").is_file()
        assert elsewhere.is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [target.name, temps[1].name, elsewhere.name]
        )
    finally:
        alive.kill()
        alive.wait()
