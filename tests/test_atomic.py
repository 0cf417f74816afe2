"""``replacing``: the new file appears whole or not at all, and no temporary is left."""

from __future__ import annotations

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
