"""SearchConfig as stored on a study: what another folder or machine reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from an_search.search import SearchConfig
from an_search.search.join import config_from_dict


def test_stored_data_and_checkpoint_paths_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data" / "flat").mkdir(parents=True)
    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig("resnet10t", data="data/flat", checkpoint=Path("w.safetensors"))
    stored = cfg.to_dict()
    assert stored["data"] == str(tmp_path / "data" / "flat")
    assert stored["checkpoint"] == str(tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path / "data")  # retrain or a worker elsewhere: the same files
    again = config_from_dict(stored)
    assert Path(again.data).is_dir() and Path(again.checkpoint).is_file()
    missing = SearchConfig("resnet10t", data="nowhere").to_dict()  # (refused later, as typed)
    assert missing["data"] == "nowhere" and SearchConfig("resnet10t").to_dict()["data"] is None
