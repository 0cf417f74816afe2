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


def test_a_search_for_other_objectives_gets_its_own_default_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`an-search run M` then `an-search run M --objectives top1,macs` (the README's sequence):
    the second is a new study in its own run directory, not a refused resume of the first."""
    from an_search.search import create_or_load_study

    monkeypatch.chdir(tmp_path)
    one = SearchConfig("resnet10t")
    two = SearchConfig("resnet10t", objectives="top1,macs")
    assert one.resolved_study_name("default") == "resnet10t-default"
    assert two.resolved_study_name("default") == "resnet10t-default-top1-macs"
    assert SearchConfig("m", objectives=("top1", "params")).resolved_study_name("s") == (
        "m-s-top1-params"
    )
    assert SearchConfig("m", objectives=" top1 ").resolved_study_name("s") == "m-s"
    assert SearchConfig("m", objectives="top1,macs", study_name="x").resolved_study_name("s") == "x"
    first, _ = create_or_load_study(one)
    second, _ = create_or_load_study(two)
    assert (first.study_name, len(first.directions)) == ("resnet10t-default", 1)
    assert (second.study_name, len(second.directions)) == ("resnet10t-default-top1-macs", 2)
    assert (tmp_path / "an-runs" / "resnet10t-default" / "study.db").is_file()
    assert (tmp_path / "an-runs" / "resnet10t-default-top1-macs" / "study.db").is_file()


@pytest.mark.parametrize(
    ("name", "folder"),
    [("../../escape", ".._.._escape"), ("..", "__"), ("/tmp/x", "_tmp_x"), ("a b.v2", "a b.v2")],
)
def test_a_study_name_is_one_folder_under_an_runs(
    name: str, folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_train
) -> None:
    """The default run directory, an-runs/<study name>, for a run and for a worker joining the
    study from its storage: a name with '/' or of dots was a path (``../../x`` wrote outside
    an-runs/, ``/tmp/x`` anywhere)."""
    from an_search.search import join_config
    from an_search.search.study import prepare_search

    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig("resnet10t", study_name=name, train=tiny_train())
    assert cfg.run_dir("default") == Path("an-runs") / folder
    prepare_search(cfg)  # (the study in the run directory's study.db)
    assert [p.name for p in tmp_path.iterdir()] == ["an-runs"]
    assert [p.name for p in (tmp_path / "an-runs").iterdir()] == [folder]
    db = tmp_path / "an-runs" / folder / "study.db"
    assert join_config(f"sqlite:///{db}", name).output_dir == str(Path("an-runs") / folder)


def test_a_study_an_earlier_version_put_in_nested_folders_stays_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``team/r50`` was an-runs/team/r50: a resume there must find its study, not start one in
    an-runs/team_r50; a name whose old folder is outside an-runs/ does not get it back."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "an-runs" / "team" / "r50").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    assert SearchConfig("resnet10t", study_name="team/r50").run_dir("d") == Path("an-runs/team/r50")
    assert SearchConfig("resnet10t", study_name="team/r51").run_dir("d") == Path("an-runs/team_r51")
    assert SearchConfig("resnet10t", study_name="../x").run_dir("d") == Path("an-runs/.._x")


def test_a_joined_study_gets_its_space_whatever_the_files_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_train
) -> None:
    """A space file without a .yaml suffix (``run`` takes any file) that is not on the joining
    machine is written from the study, as a .yaml one is (the worker read the path as a
    shipped name: "must be a shipped name or a YAML file"); a shipped space stays its name."""
    from an_search.search import join_config, load_space
    from an_search.search.study import prepare_search

    monkeypatch.chdir(tmp_path)
    (tmp_path / "myspace").write_text("placement: paper\nhead: mlp\n")
    for space, name in (("myspace", "own"), ("default", "shipped")):
        cfg = SearchConfig("resnet10t", space=space, study_name=name, train=tiny_train())
        prepare_search(cfg)
    (tmp_path / "myspace").unlink()  # (not on this "machine")
    joined = join_config(f"sqlite:///{tmp_path / 'an-runs' / 'own' / 'study.db'}", "own")
    assert Path(joined.space) == Path("an-runs") / "own" / "myspace.yaml"
    assert load_space(joined.space).head.value == "mlp"
    shipped = join_config(f"sqlite:///{tmp_path / 'an-runs' / 'shipped' / 'study.db'}", "shipped")
    assert shipped.space == "default"


def test_a_folder_named_like_a_shipped_space_does_not_hide_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from an_search.errors import SpaceError
    from an_search.search import load_space

    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert load_space("default").source == "search_spaces/default"
    with pytest.raises(SpaceError, match=r"must be a shipped name .* or a YAML file: ''$"):
        load_space("")
