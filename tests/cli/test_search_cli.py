"""an-search run / report / export / retrain end to end through CliRunner, and bad input."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.search import app

RUNNER = CliRunner()
ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
TINY = ["--epochs", "1", "--batches-per-epoch", "2", "--batch-size", "16"]


def run(*args: str) -> tuple[int, str, str]:
    res = RUNNER.invoke(app, list(args), env=ENV)
    return res.exit_code, res.stdout, res.stderr


def test_run_report_export_retrain(tmp_path: Path) -> None:
    import an_search

    out = tmp_path / "run"
    code, stdout, err = run(
        "run", "resnet10t", "--n-trials", "3", *TINY, "--val-fraction", "0.05",
        "--output", str(out), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert "unconverted baseline" in stdout and "paper placement" in stdout
    assert "vs base" in stdout  # (top-1 minus the unconverted model's; "vs BN" said BN of any)
    for name in ("study.db", "trials.csv", "report.json", "pareto.png", "history.png"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    code, stdout, err = run("report", str(out), "--json")
    assert code == 0, err
    rows = json.loads(stdout)["trials"]
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert rows[0]["baseline"] == "bn" and rows[1]["baseline"] == "paper"

    code, stdout, err = run("export", str(out), "--top", "1", "--json")
    assert code == 0, err
    (exported,) = json.loads(stdout)["exported"]
    recipe_dir = Path(exported)
    assert (recipe_dir / "recipe.json").is_file()
    assert "note:" not in err
    code, stdout, err = run("export", str(out), "--top", "5", "--json")
    assert code == 0, err
    more = json.loads(stdout)["exported"]  # the trials with AN: the paper's, the sampled one
    assert more[0] == exported and 1 <= len(more) <= 2
    assert f"note: {len(more)} of the 5 asked for" in err
    (paper,) = [Path(m).name for m in more if Path(m).name.endswith("_trial1")]  # (it ranks)
    assert err.rstrip().endswith(f"; {paper} is the paper placement's baseline trial")
    winner = an_search.rewrite.read_recipe(recipe_dir)

    # the winner into an ImageNet-size model, as an-convert: the searched sites, K and heads
    from cli.convert import app as convert_app

    res = RUNNER.invoke(
        convert_app,
        ["--recipe", str(recipe_dir), "--num-classes", "1000", "--img-size", "64", "--json",
         "--output", str(tmp_path / "r10t-in1k")],
        env=ENV,
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    converted = json.loads(res.stdout)
    assert converted["model"] == winner.model and converted["input_size"] == [3, 64, 64]
    assert {s["name"]: s["k"] for s in converted["sites"]} == winner.site_k()
    model, saved = an_search.load(tmp_path / "r10t-in1k")
    assert saved.sites == winner.sites and saved.model_kwargs["num_classes"] == 1000
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)

    retrain = ["retrain", str(recipe_dir), *TINY, "--baseline", "--output", str(tmp_path / "rt"),
               "--ema", "0.5"]  # fmt: skip
    code, stdout, err = run(*retrain, "--json", "--quiet")
    assert code == 0, err
    runs = json.loads(stdout)["runs"]
    assert [r["run"] for r in runs] == ["an", "baseline"]
    assert runs[0]["params"] > runs[1]["params"]
    model, recipe = an_search.load(runs[0]["model_dir"])
    assert len(recipe.sites) > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    from an_search.train import load_checkpoint

    for r in runs:  # the EMA's top-1 too (before: only in last.pth)
        assert (
            r["ema_top1"] == load_checkpoint(tmp_path / "rt" / r["run"])["history"][-1]["ema_top1"]
        )
    code, stdout, err = run(*retrain, "--resume")  # (nothing left to train: the table)
    assert code == 0, err
    assert "EMA top1" in stdout and f"{runs[0]['ema_top1']:.2f}" in stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "resnet10t", "--space", "/nonexistent/space.yaml"], "space"),
        (["run", "resnet10t", "--data", "/nonexistent/data"], "/nonexistent/data"),
        (["run", "resnet10t", "--max-params", "1000"], "params"),
        (["run", "resnet10t", "--objectives", "top1,speed"], "speed"),
        (["run", "resnet10t", "--epochs", "0"], "epochs"),
        pytest.param(
            ["run", "resnet10t", "--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),  # (it was an "internal error" after the baseline's build)
        (["report", "/nonexistent/run"], "no run directory '/nonexistent/run'"),
        (["run", "resnet10t", "--max-params", "11.8e2"], "--max-params=1,180"),  # floats taken
        (["run", "resnet10t", "--max-macs", "0.5"], "--max-macs=0.5"),  # not cut to 0
        (["run", "resnet10t", "--n-trials", "-1"], "--n-trials must be positive, got -1"),
        (["run", "resnet10t", "--timeout", "-1"], "--timeout must be positive"),
        (["run", "resnet10t", "--seed", "-1"], "seed must be 0 or more, got -1"),
        (["run", "resnet10t", "--device", "tpu"], "device must be cpu, cuda or cuda:N"),
        (["export", "/nonexistent/run", "--top", "0"], "--top must be at least 1, got 0"),
        # command lines click cannot parse: one line too, not typer's usage box
        (["export", "/nonexistent/run", "--top", "abc"], "Invalid value for '--top'"),
        (["export", "--topp", "3"], "No such option: --topp"),
        (["bogus"], "No such command 'bogus' (see '"),
        (["run"], "Missing argument 'model' (see '"),
        (["export", "--top"], "Option '--top' requires an argument (see the command's --help)"),
    ],
)
def test_bad_input_one_line_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    code, out, err = run(*args, *(["--output", str(tmp_path / "o")] if args[0] == "run" else []))
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0]
    assert not (tmp_path / "o" / "study.db").exists()


def test_unopenable_storage(tmp_path: Path) -> None:
    code, _, err = run(
        "run", "resnet10t", "--storage", "postgresql://nobody@127.0.0.1:1/none",
        "--output", str(tmp_path / "o"), *TINY,
    )  # fmt: skip
    assert code == 2 and "Traceback" not in err and err.startswith("error:")


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\nsys.argv = ['an-search', 'run', '--help']\nfrom cli.search import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--n-trials" in res.stdout and res.stdout.strip().endswith("NOTORCH")


def test_retrain_of_a_recipe_for_other_classes_needs_data(tmp_path: Path) -> None:
    from an_search.rewrite import Recipe

    recipe = Recipe.from_selection(
        model="resnet10t", selected={"layer1.0.bn1": 4}, model_kwargs={"num_classes": 3}
    )
    (tmp_path / "recipe.json").write_text(recipe.to_json())
    code, _, err = run("retrain", str(tmp_path), *TINY)
    assert code == 2 and "has 3 classes, the embedded data 10" in err and "--data" in err


def test_retrain_on_data_of_other_classes_than_the_recipes_says_so(tmp_path: Path) -> None:
    import tarfile

    from an_search.rewrite import Recipe
    from an_search.train.data import EMBEDDED_ROOT

    with tarfile.open(EMBEDDED_ROOT / "train.tar") as tf:  # 3 of its classes, 8 images each
        members = [m for m in tf.getmembers() if m.isfile()]
        classes = sorted({m.name.split("/")[0] for m in members})[:3]
        for cls in classes:
            for m in [m for m in members if m.name.startswith(cls + "/")][:8]:
                (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
                (tmp_path / "data" / m.name).write_bytes(tf.extractfile(m).read())
    recipe = Recipe.from_selection(
        model="resnet10t", selected={"layer1.0.bn1": 4}, model_kwargs={"num_classes": 10}
    )
    (tmp_path / "recipe.json").write_text(recipe.to_json())
    args = ["--epochs", "1", "--batches-per-epoch", "1", "--batch-size", "8"]
    code, _, err = run("retrain", str(tmp_path), *args, "--data", str(tmp_path / "data"))
    assert code == 0, err
    assert "note: the recipe's model has 10 classes, this data 3: its classifier is made " in err


def test_retrain_progress_shows_the_training_not_an_empty_trial_count(tmp_path: Path) -> None:
    from an_search.rewrite import Recipe

    recipe = Recipe.from_selection(
        model="resnet10t", selected={"layer1.0.bn1": 4}, model_kwargs={"num_classes": 10}
    )
    (tmp_path / "recipe.json").write_text(recipe.to_json())
    code, _, err = run("retrain", str(tmp_path), *TINY, "--output", str(tmp_path / "rt"))
    assert code == 0, err
    (bar,) = [line for line in err.splitlines() if line.startswith("training")]
    assert "2/2" in bar  # TINY: one epoch of two updates
    assert "trials" not in err and "note:" not in err
    for out, found in (("rt", True), ("rt2", False)):  # --resume without a checkpoint says so
        code, _, err = run(
            "retrain", str(tmp_path), *TINY, "--output", str(tmp_path / out), "--resume"
        )
        assert code == 0, err
        note = f"note: --resume found no checkpoint in {tmp_path / out}: training from the start"
        assert (note in err) is not found, err


@pytest.mark.parametrize("checkpointed", [True, False])
def test_ctrl_c_in_retrain_says_whether_there_is_a_checkpoint_to_resume(
    checkpointed: bool, tmp_path: Path, monkeypatch
) -> None:
    import an_search.train.retrain as retrain_module
    from an_search.rewrite import Recipe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrain_module, "retrain", interrupted)
    recipe = Recipe.from_selection(model="resnet10t", selected={"layer1.0.bn1": 4})
    (tmp_path / "recipe.json").write_text(recipe.to_json())
    (tmp_path / "rt" / "an").mkdir(parents=True)
    (tmp_path / "rt" / "an" / "last.pth").write_bytes(b"")  # an earlier run's: not resumable
    os.utime(tmp_path / "rt" / "an" / "last.pth", (0, 0))
    if checkpointed:  # (an epoch of this run had ended: its checkpoint is there)
        (tmp_path / "rt" / "baseline").mkdir(parents=True)
        (tmp_path / "rt" / "baseline" / "last.pth").write_bytes(b"")
        os.utime(tmp_path / "rt" / "baseline" / "last.pth", (time.time() + 5, time.time() + 5))
    code, _, err = run("retrain", str(tmp_path), *TINY, "--output", str(tmp_path / "rt"))
    assert code == 130
    said = (
        f"checkpoints are kept in {tmp_path / 'rt'}: re-run with --resume to continue"
        if checkpointed
        else "no epoch had ended, so there is no checkpoint to resume from (re-run to start)"
    )
    assert err.strip().splitlines() == [
        "data: the embedded Animal-MNIST",
        f"error: interrupted; {said}",
    ]


@pytest.mark.parametrize("where", ["trials", "report"])
def test_ctrl_c_in_run_says_how_to_go_on(where: str, tmp_path: Path, monkeypatch) -> None:
    """During the trials, a re-run continues the study (adding --n-trials); during the final
    report, the study is done: a re-run would add trials, so the report command is named."""
    import optuna

    import an_search.search as search

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    study = optuna.create_study(direction="maximize")
    monkeypatch.setattr(
        search, "run_search", interrupted if where == "trials" else lambda *a, **k: study
    )
    monkeypatch.setattr(search, "write_report", interrupted)
    out = tmp_path / "run"
    code, _, err = run("run", "resnet10t", *TINY, "--output", str(out), "--quiet")
    assert code == 130
    said = (
        "finished trials are kept: the same command continues the study (adding --n-trials)"
        if where == "trials"
        else f"the study is done; write its report with: an-search report {out}"
    )
    assert err.strip().splitlines()[-1] == f"error: interrupted; {said}"


def test_export_with_nothing_to_export_is_an_error(tmp_path: Path) -> None:
    import optuna

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    optuna.create_study(study_name="empty", storage=f"sqlite:///{run_dir / 'study.db'}")
    code, out, err = run("export", str(run_dir))
    assert code == 2 and out == ""
    assert "has no finished, feasible trial with AN to export yet" in err


@pytest.mark.parametrize("command", ["report", "export", "retrain"])
def test_a_study_file_given_for_its_run_directory_is_read_there(
    tmp_path: Path, command: str
) -> None:
    """``report RUN/study.db`` (or a journal file): the study is read from the file and written
    beside it, as for RUN (before: "directory cannot be created (File exists): RUN/study.db")."""
    import optuna
    from optuna.trial import create_trial

    from an_search.rewrite import Recipe

    study = optuna.create_study(
        study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize"
    )
    recipe = Recipe.from_selection(model="resnet10t", selected={"layer1.0.bn1": 4}).to_dict()
    attrs = {"macs": 2e7, "params": 5e6, "recipe": recipe, "n_sites": 1, "config_key": "a"}
    study.add_trial(create_trial(value=40.0, user_attrs=attrs))
    if command == "retrain":  # (the study's best, from its trial: no recipe file)
        code, _, err = run(
            command, str(tmp_path / "study.db"), *TINY, "--output", str(tmp_path / "rt")
        )
        assert code == 0, err
        assert "recipe: trial 0 of study 's'" in " ".join(err.split())
        return
    code, _, err = run(command, str(tmp_path / "study.db"))
    assert code == 0, err
    made = tmp_path / "report.json" if command == "report" else tmp_path / "export" / "rank1_trial0"
    assert made.exists()


def test_report_names_the_storage_it_read_whatever_optuna_storage_says(tmp_path: Path) -> None:
    import optuna

    dbs = []
    for name in ("mine", "other"):
        (tmp_path / name).mkdir()
        dbs.append(f"sqlite:///{tmp_path / name / 'study.db'}")
        optuna.create_study(study_name=name, storage=dbs[-1])
    res = RUNNER.invoke(
        app, ["report", str(tmp_path / "mine")], env={**ENV, "OPTUNA_STORAGE": dbs[1]}
    )
    assert res.exit_code == 0, res.stderr
    assert "study mine" in res.stdout
    assert f"dashboard: optuna-dashboard {dbs[0]}" in res.stderr and dbs[1] not in res.stderr


def test_the_report_tells_close_small_costs_apart(tmp_path: Path) -> None:
    """Two proxy-size models 0.2% apart in MACs: the tables must not print them equal (a
    front that lists both would look wrong)."""
    import optuna
    from optuna.trial import create_trial

    study = optuna.create_study(
        study_name="close", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize"
    )
    for macs, top1 in ((22_557_440, 33.4), (22_597_912, 42.6)):
        attrs = {"macs": macs, "params": 5_000_000, "config": {"placement": "all"}}
        study.add_trial(create_trial(value=top1, user_attrs=attrs))
    for columns in ("200", "60"):  # a narrow terminal wraps the configuration, cuts no cost
        res = RUNNER.invoke(app, ["report", str(tmp_path)], env={**ENV, "COLUMNS": columns})
        assert res.exit_code == 0, res.stderr
        table, front = res.stdout.split("Pareto front")
        for text in (table, front):  # both trials are on the front: cheaper, or more accurate
            assert "0.02255744" in text and "0.02259791" in text, text


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--n-trials", "0"], "error: --n-trials must be positive, got 0"),
        (["--batch-size", "1"], "error: --batch-size must be at least 2"),
        (["--val-fraction", "2"], "error: --val-fraction must be in (0, 1], got 2.0"),
        (["--batches-per-epoch", "0"], "error: --batches-per-epoch must be at least 1, got 0"),
        (["--max-params", "1000"], "error: --max-params is below the unconverted resnet10t's"),
    ],
)
def test_errors_name_the_options_the_user_typed(tmp_path: Path, args: list, line: str) -> None:
    code, _, err = run("run", "resnet10t", *args, "--output", str(tmp_path / "out"))
    assert code == 2 and err.startswith(line), err
    assert "_" not in err.split(":")[1]  # no Python field name (n_trials, max_params...)
    assert not (tmp_path / "out").exists()


def test_python_names_in_paths_are_left_alone(tmp_path: Path) -> None:
    from cli._common import as_flags

    assert as_flags("no images in /data/img_size/train; lower batch_size") == (
        "no images in /data/img_size/train; lower --batch-size"
    )
    # a stored study's proxy settings; plain words stay words
    assert as_flags("study 'a' was run with train.batch_size 64, this call has 32") == (
        "study 'a' was run with --batch-size 64, this call has 32"
    )
    assert (
        as_flags("train.epochs 3 over 3 epochs, seed kept") == "--epochs 3 over 3 epochs, seed kept"
    )
    assert as_flags("train.label_smoothing 0.1") == "train.label_smoothing 0.1"  # no such option
    # values as typed (quoted) are never rewritten
    code, _, err = run("run", "resnet10t", "--data", "img_size", "--output", str(tmp_path / "o"))
    assert code == 2 and "data path 'img_size' does not exist" in err
    assert as_flags("needed (--study-name): 'resnet10t-default', 'batch_size'") == (
        "needed (--study-name): 'resnet10t-default', 'batch_size'"
    )


def _torchvision_mnist(root: Path, train: int, test: int) -> Path:
    """root/MNIST/raw/*-ubyte: torchvision's MNIST files (random digits, labels 0..9 in turn)."""
    import struct

    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        labels = (np.arange(n) % 10).astype(np.uint8).tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + pixels
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels)
    return root


def test_an_exported_recipe_of_a_study_in_another_storage(tmp_path: Path) -> None:
    """A study kept outside its run directory (a journal file here; a server database): a
    recipe export wrote into the run directory retrains on the study's data given the study's
    --storage, and without it says that the study's data and weights go unused (before:
    silently the embedded data, and random init)."""
    root = _torchvision_mnist(tmp_path / "root", train=160, test=40)
    out, journal = tmp_path / "run", str(tmp_path / "j.log")
    code, _, err = run(
        "run", "resnet10t", "--dataset", "torch/mnist", "--data", str(root), "--n-trials", "2",
        *TINY, "--storage", journal, "--output", str(out), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    code, stdout, err = run("export", "--storage", journal, "--top", "1", "--output",
                            str(out / "export"), "--json")  # fmt: skip
    (exported,) = json.loads(stdout)["exported"]
    code, _, err = run("retrain", exported, *TINY, "--output", str(tmp_path / "rt"))
    assert code == 0, err
    assert f"note: {out} holds no study file (its study is in another storage)" in err
    code, _, err = run("retrain", exported, *TINY, "--storage", journal,
                       "--output", str(tmp_path / "rt2"))  # fmt: skip
    assert code == 0 and f"data: torch/mnist in {root} (the study's" in err, err
    assert "holds no study file" not in err
    # another model's study is not this recipe's
    from an_search.search import SearchConfig, create_or_load_study

    create_or_load_study(SearchConfig("resnet18", storage=journal, output_dir=tmp_path / "r18"))
    code, _, err = run("retrain", exported, "--storage", journal, "--study-name",
                       "resnet18-default", *TINY)  # fmt: skip
    assert code == 2 and "study 'resnet18-default' searched resnet18, the recipe converts" in err


def test_a_timm_named_dataset_from_a_local_root(tmp_path: Path) -> None:
    """--dataset torch/mnist --data ROOT: timm's torchvision reader, its own train/test splits;
    retrain of the run directory trains on the study's dataset."""
    import optuna

    root = _torchvision_mnist(tmp_path / "root", train=160, test=40)
    out = tmp_path / "run"
    code, _, err = run(
        "run", "resnet10t", "--dataset", "torch/mnist", "--data", str(root), "--n-trials", "2",
        *TINY, "--output", str(out), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    study = optuna.load_study(study_name="resnet10t-default", storage=f"sqlite:///{out}/study.db")
    assert study.user_attrs["config"]["dataset"] == "torch/mnist"
    assert study.user_attrs["data"]["train_images"] == 160
    assert study.user_attrs["data"]["validation_images"] == 40
    assert study.user_attrs["data"]["classes"][:2] == ["0 - zero", "1 - one"]
    done = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert [t.user_attrs["baseline"] for t in done] == ["bn", "paper"]
    assert all(t.user_attrs["steps"] == 2 for t in done)

    code, _, err = run("retrain", str(out), *TINY, "--output", str(tmp_path / "rt"))
    assert code == 0, err
    assert f"data: torch/mnist in {root} (the study's" in err
    # an exported recipe in the run directory: the study's data too
    code, stdout, err = run("export", str(out), "--top", "1", "--json")
    (exported,) = json.loads(stdout)["exported"]
    code, _, err = run("retrain", exported, *TINY, "--output", str(tmp_path / "rt2"),
                       "--study-name", "resnet10t-default")  # fmt: skip
    assert code == 0 and f"data: torch/mnist in {root} (the study's" in err, err
    # the files moved: --data alone keeps the study's dataset name
    root.rename(tmp_path / "moved")
    code, _, err = run("retrain", str(out), *TINY, "--data", str(tmp_path / "moved"),
                       "--output", str(tmp_path / "rt3"))  # fmt: skip
    assert code == 0 and f"data: torch/mnist in {tmp_path / 'moved'}" in err, err

    code, _, err = run(
        "run", "resnet10t", "--dataset", "torch/mnist", "--data", str(tmp_path / "none"),
        "--output", str(tmp_path / "bad"),
    )  # fmt: skip
    assert code == 2 and "cannot open torch/mnist's train split" in err
    assert not (tmp_path / "bad").exists()


def test_a_study_whose_data_moved_asks_for_its_path_here(tmp_path: Path) -> None:
    """retrain and worker read the study's data path; where it is gone, they ask for --data
    (and retrain with --data of the moved images works)."""
    import tarfile

    from an_search.train.data import EMBEDDED_ROOT

    data = tmp_path / "imgs"
    taken: dict[str, int] = {}
    with tarfile.open(EMBEDDED_ROOT / "train.tar") as tar:
        for member in tar.getmembers():
            name = member.name.split("/")[0]
            if member.isfile() and (name in taken or len(taken) < 2):
                if taken.setdefault(name, 0) < 40:
                    taken[name] += 1
                    (data / member.name).parent.mkdir(parents=True, exist_ok=True)
                    (data / member.name).write_bytes(tar.extractfile(member).read())
    out = tmp_path / "run"
    code, _, err = run("run", "resnet10t", "--data", str(data), "--n-trials", "2", *TINY,
                       "--output", str(out), "--quiet")  # fmt: skip
    assert code == 0, err
    data.rename(tmp_path / "moved")
    code, _, err = run("retrain", str(out), *TINY, "--output", str(tmp_path / "rt"))
    assert code == 2 and f"the study's data '{data}' is not on this machine" in err
    assert "--data" in err
    code, _, err = run("worker", "--storage", str(out / "study.db"), "--n-trials", "1")
    assert code == 2 and f"the study's data '{data}' is not on this machine" in err
    code, _, err = run("retrain", str(out), *TINY, "--data", str(tmp_path / "moved"), "--output",
                       str(tmp_path / "rt"), "--quiet")  # fmt: skip
    assert code == 0, err


def test_the_pruner_is_chosen_on_the_command_line(tmp_path: Path) -> None:
    import optuna

    out = tmp_path / "run"
    code, _, err = run("run", "resnet10t", "--pruner", "bogus", *TINY, "--output", str(out))
    assert code == 2 and "unknown pruner (known: auto, hyperband, none): 'bogus'" in err
    assert not out.exists()  # refused before a study or run directory was made
    code, _, err = run(
        "run", "resnet10t", "--pruner", "none", "--n-trials", "1", *TINY, "--output", str(out),
        "--quiet",
    )  # fmt: skip
    assert code == 0, err
    study = optuna.load_study(study_name="resnet10t-default", storage=f"sqlite:///{out}/study.db")
    assert study.user_attrs["config"]["pruner"] == "none"


def test_retrain_of_a_study_starts_from_the_weights_its_trials_started_from(
    tmp_path: Path,
) -> None:
    """A search from --checkpoint ranks trials trained from those weights: its winner retrains
    from them too (before: from random init, with no word), found where the study stored them
    and checked to be the same content."""
    import hashlib

    import timm

    from an_search.train.checkpoint import load_checkpoint

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "run"
    args = ["--epochs", "1", "--batches-per-epoch", "1", "--batch-size", "8"]
    code, _, err = run(
        "run", "resnet10t", "--n-trials", "2", *args, "--val-fraction", "0.05",
        "--checkpoint", str(weights), "--output", str(out), "-q",
    )  # fmt: skip
    assert code == 0, err
    import optuna

    study = optuna.load_study(study_name="resnet10t-default", storage=f"sqlite:///{out}/study.db")
    # the default space fixes init: paper; the paper baseline starts so too, as sampled trials
    # (before: as the loaded norms, preserve, unlike the trials it was compared with)
    assert study.trials[1].user_attrs["recipe"]["init"] == "paper"
    assert run("export", str(out), "--top", "1")[0] == 0
    for source, rt in (
        (out, tmp_path / "rt1"),
        (out / "export" / "rank1_trial1", tmp_path / "rt2"),
    ):
        code, _, err = run("retrain", str(source), *args, "--output", str(rt))
        assert code == 0, err
        assert f"weights: {weights} (the study's; --checkpoint for others, --from-scratch" in err
        from_study = "recipe: trial 1 of study 'resnet10t-default' (export's rank 1 of 1, "
        assert (from_study in err) is (source == out)  # (an export folder is its own recipe)
        assert json.loads(load_checkpoint(rt / "an")["run"])["weights"] == sha
        recipe = json.loads((rt / "an" / "model" / "recipe.json").read_text())
        assert recipe["init"] == "paper"  # the trial's (before: preserve, another model)

    other = tmp_path / "other.pth"  # --checkpoint still chooses
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), other)
    code, _, err = run("retrain", str(out), *args, "-q", "--checkpoint", str(other))
    assert code == 0, err
    assert json.loads(load_checkpoint(out / "retrain" / "an")["run"])["weights"] != sha

    scratch = tmp_path / "rt4"  # --from-scratch: random init, as without a checkpoint
    code, _, err = run("retrain", str(out), *args, "--from-scratch", "--output", str(scratch))
    assert code == 0, err
    assert "weights:" not in err
    assert json.loads(load_checkpoint(scratch / "an")["run"])["weights"] is None
    code, _, err = run("retrain", str(out), "--from-scratch", "--checkpoint", str(other))
    assert code == 2 and "--from-scratch starts from random init, --checkpoint from" in err

    weights.write_bytes(other.read_bytes())
    code, _, err = run("retrain", str(out), *args, "-q", "--output", str(tmp_path / "rt3"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"'{weights}' no longer holds the weights the study's trials started from" in err
    weights.unlink()
    code, _, err = run("retrain", str(out), *args, "-q", "--output", str(tmp_path / "rt3"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        f"which is not at '{weights}' on this machine: give its path here with --checkpoint" in err
    )
    assert not (tmp_path / "rt3").exists()


def test_retrain_of_a_multi_objective_study_takes_its_best(tmp_path: Path) -> None:
    """(Before: "internal error RuntimeError" from ``FrozenTrial.value``, which a trial of
    several objectives does not have.)"""
    import optuna

    out = tmp_path / "run"
    code, _, err = run(
        "run", "resnet10t", "--objectives", "top1,macs", "--n-trials", "2", *TINY,
        "--val-fraction", "0.05", "--output", str(out), "-q",
    )  # fmt: skip
    assert code == 0, err
    storage = f"sqlite:///{out}/study.db"
    (name,) = optuna.get_all_study_names(storage)
    paper = optuna.load_study(study_name=name, storage=storage).trials[1]  # (the AN one)
    code, _, err = run("retrain", str(out), *TINY, "--output", str(tmp_path / "rt"))
    assert code == 0, err
    assert (
        f"recipe: trial 1 of study '{name}' (export's rank 1 of 1, proxy top-1 "
        f"{paper.values[0]:.2f})" in " ".join(err.split())
    )


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("scipy") is not None,
    reason="scipy is installed here: torchvision's ImageNet reader imports it",
)
def test_a_dataset_whose_reader_needs_a_missing_package_names_it(tmp_path: Path) -> None:
    """torchvision's ImageNet reads its devkit with scipy, which an-search does not install:
    one line naming the package (before: "internal error ModuleNotFoundError", exit 1)."""
    code, out, err = run("run", "resnet10t", "--dataset", "torch/imagenet", "--data",
                         str(tmp_path), "--output", str(tmp_path / "run"))  # fmt: skip
    assert code == 2, err
    assert "reading torch/imagenet needs the Python package 'scipy'" in err
    assert "pip install scipy" in err and "internal error" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("datasets") is not None,
    reason="Hugging Face datasets is installed here",
)
def test_a_missing_reader_package_prints_nothing_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm's hfds reader prints "Please install ..." to stdout when it is first imported
    without the datasets package: stdout is the --json output's, so only the one-line error
    on stderr (before: timm's line on stdout too)."""
    monkeypatch.delitem(sys.modules, "timm.data.readers.reader_hfds", raising=False)
    code, out, err = run("run", "resnet10t", "--dataset", "hfds/beans", "--data",
                         str(tmp_path), "--output", str(tmp_path / "run"))  # fmt: skip
    assert code == 2, err
    assert "needs the Python package 'datasets'" in err and "pip install datasets" in err
    assert out == ""


@pytest.mark.parametrize(
    ("attrs", "values", "shown"),
    [
        ({"infeasible": ["params", "macs"]}, [0.0], "last #3 over budget (params, macs)"),
        ({}, [61.25], "last #3 complete top1 61.25"),
    ],
)
def test_the_trial_bar_says_a_trial_was_over_budget(attrs: dict, values: list, shown: str) -> None:
    """An over-budget trial ends COMPLETE with top-1 0, never trained: the bar says why
    (before: "last #3 complete top1 0.00", as if it had trained to nothing)."""
    import io

    import optuna
    from rich.console import Console

    from cli._progress import TrialProgress

    out = io.StringIO()
    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, values=values, user_attrs=attrs
    )
    trial.number = 3
    with TrialProgress(Console(file=out, width=200), total=5) as bar:
        bar.on_trial(None, trial)  # type: ignore[arg-type]
    assert shown in out.getvalue()


def test_trial_costs_a_k_apart_print_apart() -> None:
    """The trials table's M params and GMACs keep configurations one K apart at one site
    distinct at ResNet-50's size (AN-ResNet-50, paper placement; one 2048-channel site's K
    raised by 1: 3 x 2048 parameters, 2 x 49 x 2048 + 2048 MACs a sample, as the head and
    mixtures have them)."""
    from cli._tables import GMACS, MPARAMS, fmt

    params, macs = 25_755_420, 4_115_892_270
    more_params, more_macs = params + 3 * 2048, macs + 2 * 49 * 2048 + 2048
    assert fmt(params / 1e6, MPARAMS) != fmt(more_params / 1e6, MPARAMS)
    assert fmt(macs / 1e9, GMACS) != fmt(more_macs / 1e9, GMACS)
    assert float(fmt(params / 1e6, MPARAMS)) == pytest.approx(params / 1e6, abs=1e-5)
