"""an-convert end to end through typer's CliRunner: figures, JSON, saving, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

import an_search
from cli.convert import app

RUNNER = CliRunner()
ENV = {"NO_COLOR": "1", "COLUMNS": "200"}


def run(*args: str) -> tuple[int, str, str]:
    res = RUNNER.invoke(app, list(args), env=ENV)
    return res.exit_code, res.stdout, res.stderr


def test_resnet50_paper_figures() -> None:
    code, out, err = run("resnet50", "--placement", "paper", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["sites"]) == 16
    assert all(s["name"].endswith(".bn2") for s in data["sites"])
    per_stage = {}
    for s in data["sites"]:
        per_stage.setdefault(s["stage"], set()).add(s["k"])
    assert [per_stage[i] for i in sorted(per_stage)] == [{10}, {10}, {20}, {20}]
    assert data["params_before"] == 25_557_032
    assert data["params_after"] == 25_755_420
    assert data["macs_after"] > data["macs_before"] > 4.0e9


def test_table_output_has_totals() -> None:
    """The totals in full, as the JSON's and the budgets' (before: GMACs to 4 places, which
    showed lcnet_050 at 32 px as 0.0013 -> 0.0014 for +75,963 MACs)."""
    code, out, err = run("resnet18", "--img-size", "64")
    assert code == 0, err
    assert "layer1.0.bn1" in out
    code, js, err = run("resnet18", "--img-size", "64", "--json")
    assert code == 0, err
    data = json.loads(js)
    for name, label in (("params", "params"), ("macs", "MACs")):
        before, after = data[f"{name}_before"], data[f"{name}_after"]
        rows = [line.replace("\u2502", " ").split() for line in out.splitlines()]
        (row,) = [cells for cells in rows if cells[:1] == [label]]
        assert row[1:4] == [f"{before:,}", f"{after:,}", f"{after - before:+,}"], row


def test_list_sites_lists_all_and_converts_nothing(tmp_path: Path) -> None:
    code, out, err = run("resnet18", "--list-sites", "--json")
    assert code == 0, err
    data = json.loads(out)
    names = [s["name"] for s in data["sites"]]
    model = __import__("timm").create_model("resnet18", pretrained=False)
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sorted(names) == sorted(bns)
    assert all(s["k"] is None for s in data["sites"])


def test_output_then_reload_identical(tmp_path: Path) -> None:
    import an_search

    out_dir = tmp_path / "conv"
    code, _, err = run(
        "resnet18", "--img-size", "64", "--num-classes", "7", "--output", str(out_dir)
    )
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "recipe.json"]
    m1, _ = an_search.load(out_dir)
    m2, _ = an_search.load(out_dir)
    m1.eval()
    m2.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m1(x), m2(x), rtol=0, atol=0)


def test_the_same_command_writes_the_same_weights(tmp_path: Path) -> None:
    """--seed (0 by default) fixes the random init, the model's and AN's (before: each run
    wrote other weights); from loaded weights, preserve's noise too."""
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    torch.manual_seed(1)
    save_file(timm.create_model("resnet10t").state_dict(), weights)
    files = {}
    for name, extra in [
        ("a", []), ("b", []), ("c", ["--seed", "1"]),
        ("d", ["--checkpoint", str(weights)]), ("e", ["--checkpoint", str(weights)]),
        ("f", ["--checkpoint", str(weights), "--seed", "1"]),
    ]:  # fmt: skip
        code, _, err = run(
            "resnet10t", "--img-size", "32", "--output", str(tmp_path / name), *extra
        )
        assert code == 0, err
        files[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert files["a"] == files["b"] != files["c"]
    assert files["d"] == files["e"] != files["f"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["resnet5O"], "resnet50"),
        (["resnet18", "--k", "10,20"], "stage"),
        (["resnet18", "--k", "0"], "K"),
        (["resnet18", "--placement", "none", "--include", "nothing.*"], "--list-sites"),
        (["resnet18", "--placement", "bogus"], "paper"),
        (["resnet18", "--checkpoint", "/nonexistent/w.safetensors"], "does not exist"),
        (["resnet18.bogus_tag"], "no pretrained tag 'bogus_tag'"),
        (["resnet18", "--k", "99999999999999999999"], "from 1 to 1024"),
        (["resnet18", "--seed", "99999999999999999999"], "--seed must be an integer from 0 to "),
        (["resnet18", "--seed", "-1"], "--seed must be an integer from 0 to 4294967295, got -1"),
        (["resnet18", "--head", "[/foo]"], "'[/foo]'"),  # user text is not rich markup
        (["resnet18", "--placement", "none", "--include", "layer[ab]*"], "'layer[ab]*'"),
        (["resnet18", "--checkpoint", "w[red]x.pth"], "'w[red]x.pth'"),
        (["nf_resnet26"], "the model has no normalization layer, and AN replaces norms"),
        # command lines click cannot parse: one line too, not typer's usage box
        (["resnet18", "--bogus"], "No such option: --bogus (see '"),
        (["resnet18", "--in-chans", "x"], "Invalid value for '--in-chans'"),
        (["resnet18", "resnet50"], "Got unexpected extra argument(s) (resnet50)"),
        (["resnet18", "--list-sites", "--output", "o"], "--list-sites converts nothing"),
    ],
)
def test_bad_input_one_line_exit_2(args: list[str], needle: str) -> None:
    code, out, err = run(*args, "--img-size", "32")
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    assert needle in lines[0]


def test_an_image_size_below_the_models_downsampling_one_line_exit_2() -> None:
    code, _, err = run("convnext_atto", "--img-size", "16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: a 16x16 input is too small for this model, which downsamples")
    assert err.strip().endswith("give a larger --img-size, 32 or more")


@pytest.mark.parametrize(
    ("args", "start", "end"),
    [
        (["crossvit_tiny_240", "--img-size", "32"], "error: this model fails on a 32x32 input "
         "(RuntimeError: The size of tensor a", "give its default, --img-size 240, or another "
         "size it takes"),
        (["resnet10t", "--img-size", "1000000"], "error: a batch of 1 at 1000000x1000000 needs "
         "more memory than this machine has (", "give a smaller --img-size"),
    ],
    ids=["fixed-grid", "too-large"],
)  # fmt: skip
def test_an_image_size_the_model_cannot_run_one_line_exit_2(
    args: list[str], start: str, end: str
) -> None:
    """Before: 'internal error RuntimeError' (exit 1): CrossViT's two patch grids at 32 px, or
    a 12 TB input tensor."""
    code, _, err = run(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(start) and err.strip().endswith(end), err


@pytest.mark.parametrize("size", ["0", "-5"])
def test_bad_image_size_one_line_exit_2(size: str) -> None:
    code, _, err = run("resnet18", "--img-size", size)
    assert code == 2 and err.strip() == f"error: --img-size is {size}: give an integer >= 1"


def test_errors_stay_on_one_line_in_a_narrow_terminal() -> None:
    res = RUNNER.invoke(app, ["resnet18", "--k", "1,2,3,4,5,6"], env={**ENV, "COLUMNS": "40"})
    assert res.exit_code == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "give 4 values" in res.stderr


def test_weights_holding_nan_are_refused(tmp_path: Path) -> None:
    """(Before: converted without a word; a search from them pruned every trial on a NaN loss,
    blaming the learning rate.)"""
    state = timm.create_model("resnet10t").state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["fc.bias"][3] = float("inf")
    torch.save(state, tmp_path / "w.pth")
    code, _, err = run("resnet10t", "--checkpoint", str(tmp_path / "w.pth"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "holds non-finite values (NaN or inf) in 2 tensor(s), 'layer2.0.conv1.weight' first" in err
    )


def test_saved_to_names_the_directory_given(tmp_path: Path) -> None:
    out_dir = tmp_path / "o[red]d"
    code, _, err = run("resnet10t", "--img-size", "32", "--output", str(out_dir))
    assert code == 0, err
    assert f"saved to {out_dir}/" in err and (out_dir / "recipe.json").is_file()


@pytest.mark.parametrize(
    ("stored", "given", "needle"),
    [
        (1, 2, "pass --in-chans=1 (the checkpoint's input channels)"),  # timm: NotImplementedError
        (4, 1, "pass --in-chans=4 (the checkpoint's input channels)"),  # timm: AssertionError
        (4, None, "pass --in-chans=4 (the checkpoint's input channels)"),
    ],
)
def test_weights_for_other_input_channels_name_theirs(
    stored: int, given: int | None, needle: str, tmp_path: Path
) -> None:
    """Input channels timm cannot adapt the first conv to are a one-line error naming the
    checkpoint's channels; with them it loads (the first conv is the file's)."""
    import timm

    ref = timm.create_model("resnet10t", pretrained=False, in_chans=stored)
    ckpt = tmp_path / "w.pth"
    torch.save(ref.state_dict(), ckpt)
    extra = [] if given is None else ["--in-chans", str(given)]
    code, _, err = run("resnet10t", "--checkpoint", str(ckpt), *extra)
    assert code == 2 and needle in err and "Traceback" not in err, err
    out_dir = tmp_path / "out"
    code, _, err = run(
        "resnet10t", "--checkpoint", str(ckpt), "--in-chans", str(stored), "--output", str(out_dir)
    )
    assert code == 0, err
    loaded, _ = an_search.load(out_dir)
    assert torch.equal(loaded.state_dict()["conv1.0.weight"], ref.state_dict()["conv1.0.weight"])


@pytest.mark.parametrize(
    ("model", "kwargs", "needle"),
    [
        ("resnet14t", {}, "unexpected keys"),  # (its fc takes 2048 features: not a class count)
        ("resnet10t", {"global_pool": "catavgmax"}, "1 shape mismatches (first: fc.weight"),
    ],
)
def test_weights_of_another_model_name_what_to_check(
    model: str, kwargs: dict, needle: str, tmp_path: Path
) -> None:
    """A classifier that differs in its inputs, not its classes, is no --num-classes matter."""
    import timm

    ckpt = tmp_path / "w.pth"
    torch.save(timm.create_model(model, pretrained=False, **kwargs).state_dict(), ckpt)
    code, _, err = run("resnet10t", "--checkpoint", str(ckpt))
    assert code == 2 and needle in err and "class classifier" not in err, err
    assert "check that it is this model's (name, classes, input channels, image size)" in err


def test_another_classifier_needs_num_classes(tmp_path: Path) -> None:
    """timm's load_checkpoint refuses a 10-class checkpoint for a 1000-class model; so do we,
    naming --num-classes (with it, the classifier is kept)."""
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    ckpt = tmp_path / "w10.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    out_dir = tmp_path / "out"
    code, _, err = run("resnet10t", "--checkpoint", str(ckpt), "--output", str(out_dir))
    assert code == 2 and "10-class classifier" in err
    assert "pass --num-classes=10 to keep it, or another --num-classes for a new" in err
    assert err.count("--num-classes") == 2  # (named once each, not twice)
    assert not out_dir.exists()
    code, _, err = run(
        "resnet10t", "--checkpoint", str(ckpt), "--num-classes", "10", "--output", str(out_dir)
    )
    assert code == 0, err
    model, _ = __import__("an_search").load(out_dir)
    assert torch.equal(model.fc.weight, ref.fc.weight)


def test_list_sites_marks_the_norms_an_cannot_replace() -> None:
    code, out, err = run("test_efficientnet_evos", "--list-sites", "--img-size", "32")
    assert code == 0, err
    rows = [ln for ln in out.splitlines() if "EvoNorm2dS0" in ln]
    assert rows and all("(unsupported)" in ln for ln in rows)
    assert "13 AN cannot replace" in out
    code, out, _ = run("test_efficientnet_evos", "--list-sites", "--img-size", "32", "--json")
    sites = json.loads(out)["sites"]
    assert len(sites) == 13 and not any(s["supported"] for s in sites)
    code, out, _ = run("resnet10t", "--list-sites", "--img-size", "32", "--json")
    assert all(s["supported"] for s in json.loads(out)["sites"])


def test_models_without_blocks_convert_with_the_default_placement() -> None:
    code, out, err = run("vgg11_bn", "--img-size", "32", "--json")
    assert code == 0, err
    assert len(json.loads(out)["sites"]) == 8  # each of its 8 BatchNorms follows a 3x3 conv


def test_corrupt_and_mismatched_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = run("resnet18", "--checkpoint", str(bad), "--img-size", "32")
    assert code == 2 and "is no weights file" in err and "Traceback" not in err

    other = __import__("timm").create_model("resnet34", pretrained=False)
    wrong = tmp_path / "resnet34.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    code, _, err = run("resnet18", "--checkpoint", str(wrong), "--img-size", "32")
    assert code == 2 and "does not match" in err


def test_checkpoint_loaded_and_preserved(tmp_path: Path) -> None:
    """A converted model with loaded weights keeps the original's eval outputs (init preserve)."""
    import timm
    from safetensors.torch import save_file

    import an_search

    ref = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    out_dir = tmp_path / "out"
    code, _, err = run(
        "resnet18",
        "--checkpoint",
        str(ckpt),
        "--num-classes",
        "5",
        "--output",
        str(out_dir),
        "--img-size",
        "32",
    )
    assert code == 0, err
    model, recipe = an_search.load(out_dir)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_unwritable_output_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run("resnet18", "--img-size", "32", "--output", str(blocker / "sub"))
    assert code == 2 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['an-convert', '--help']\n"
        "from cli.convert import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Convert MODEL" in res.stdout
    assert res.stdout.strip().endswith("NOTORCH")


def test_recipe_conflicts_and_missing_inputs_are_one_line_errors(tmp_path: Path) -> None:
    from an_search.rewrite import Recipe

    folder = tmp_path / "rank1_trial4"
    folder.mkdir()
    recipe = Recipe("resnet10t", {"num_classes": 10}, [{"name": "layer1.0.bn2", "k": 3}])
    (folder / "recipe.json").write_text(recipe.to_json())
    code, out, err = run("--recipe", str(folder), "--json")
    assert code == 0, err
    assert [(s["name"], s["k"]) for s in json.loads(out)["sites"]] == [("layer1.0.bn2", 3)]
    for flag, value in (("--placement", "all"), ("--k", "4"), ("--head", "mlp")):
        code, _, err = run("--recipe", str(folder), flag, value)
        assert code == 2 and f"drop {flag}, or drop --recipe" in err, err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run("--recipe", str(tmp_path / "none"))
    assert code == 2 and "no recipe at" in err and "Traceback" not in err
    code, _, err = run()
    assert code == 2 and "no model given" in err
    code, _, err = run("mobilenetv3_small_050", "--recipe", str(folder))  # another model
    assert code == 2 and "the recipe converts resnet10t, not mobilenetv3_small_050: " in err


def _weights(tmp_path: Path, name: str, **kwargs: object) -> tuple[Path, dict]:
    import timm
    from safetensors.torch import save_file

    state = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    path = tmp_path / f"{name}-{len(kwargs)}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_a_recipe_with_weights_takes_the_weights_model(tmp_path: Path) -> None:
    """A recipe searched on 1-channel 10-class 32 px data, given ImageNet-shaped weights and no
    sizes: the weights' model (3 channels, their 1000-class classifier kept), as a plain
    conversion with those weights would be; --in-chans and --num-classes still choose."""
    import an_search

    searched = an_search.convert(
        "resnet10t", placement="all", k=3, num_classes=10, in_chans=1, img_size=32, cost=False
    )
    an_search.save(searched.model, searched.recipe, tmp_path / "gray")
    ckpt, state = _weights(tmp_path, "resnet10t")
    code, out, err = run("--recipe", str(tmp_path / "gray"), "--checkpoint", str(ckpt), "--json",
                         "--output", str(tmp_path / "rgb"))  # fmt: skip
    assert code == 0, err
    import timm

    own_size = list(timm.create_model("resnet10t", pretrained=False).pretrained_cfg["input_size"])
    assert json.loads(out)["input_size"] == own_size  # (3, 176, 176): the model's own
    model, recipe = an_search.load(tmp_path / "rgb")
    assert recipe.model_kwargs == {} and recipe.init == "preserve"
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])  # kept, (1000, 512)
    assert recipe.site_k() == searched.selected
    code, out, err = run("--recipe", str(tmp_path / "gray"), "--checkpoint", str(ckpt), "--json",
                         "--in-chans", "1", "--num-classes", "7", "--img-size", "40")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["input_size"] == [1, 40, 40]
    # without weights, the recipe's own model; --list-sites lists that model's sites
    code, out, err = run("--recipe", str(tmp_path / "gray"), "--json")
    assert code == 0 and json.loads(out)["input_size"] == [1, 32, 32]
    code, out, err = run("--recipe", str(tmp_path / "gray"), "--list-sites", "--json")
    assert code == 0, err
    assert {s["name"] for s in json.loads(out)["sites"]} >= set(searched.selected)


def test_a_saved_an_model_is_a_recipe_with_its_own_weights(tmp_path: Path) -> None:
    """`an-convert --recipe DIR --checkpoint DIR/model.safetensors --num-classes 5`: the
    converted weights load after converting (a new 5-class head), the rest bit for bit."""
    import an_search

    torch.manual_seed(0)
    first = an_search.convert("resnet10t", placement="paper", k=4, num_classes=10, cost=False)
    an_search.save(first.model, first.recipe, tmp_path / "an")
    code, _, err = run("--recipe", str(tmp_path / "an"), "--checkpoint",
                       str(tmp_path / "an" / "model.safetensors"), "--num-classes", "5",
                       "--output", str(tmp_path / "five"))  # fmt: skip
    assert code == 0, err
    model, recipe = an_search.load(tmp_path / "five")
    old, new = first.model.state_dict(), model.state_dict()
    assert new["fc.weight"].shape == (5, 512) and recipe.model_kwargs == {"num_classes": 5}
    for key, value in old.items():
        if not key.startswith("fc."):
            assert torch.equal(new[key], value), key
    # --list-sites of the same: the model's sites, as without weights (before: the AN weights
    # loaded into the plain model, "give its recipe too" for the command that gave it)
    for weights in ([], ["--checkpoint", str(tmp_path / "an" / "model.safetensors")]):
        code, out, err = run("--recipe", str(tmp_path / "an"), *weights, "--list-sites", "--json")
        assert code == 0, err
        assert [s["name"] for s in json.loads(out)["sites"]] == [s.name for s in first.report.sites]


def test_bad_recipe_fields_and_init_are_named_as_such(tmp_path: Path) -> None:
    from an_search.rewrite import Recipe

    def recipe(**kwargs: object) -> str:
        folder = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        site = [{"name": "layer1.0.bn2", "k": 3}]
        data = {**Recipe("resnet10t", {}, site).to_dict(), "model_kwargs": kwargs}  # (as
        (folder / "recipe.json").write_text(json.dumps(data))  # written by hand: unchecked)
        return str(folder)

    code, _, err = run("--recipe", recipe(), "--init", "bogus")
    assert code == 2 and "unknown init 'bogus'; use one of: paper, preserve" in err
    code, _, err = run("--recipe", recipe(num_classes="ten"))
    assert code == 2 and "invalid recipe: num_classes is 'ten'" in err and "--num" not in err
    for kwargs, needle in (
        ({"foo": 1}, "timm cannot build 'resnet10t' with {'foo': 1}"),
        ({"pretrained": True}, "invalid recipe: model_kwargs 'pretrained' would load weights"),
        ({"checkpoint_path": "w.pth"}, "model_kwargs 'checkpoint_path' would load weights"),
    ):
        code, _, err = run("--recipe", recipe(**kwargs))
        assert code == 2 and needle in err, err
        assert len(err.strip().splitlines()) == 1


def test_output_shows_each_sites_head_pool_and_the_init(tmp_path: Path) -> None:
    from an_search.rewrite import Recipe

    sites = [
        {"name": "layer1.0.bn2", "k": 3, "head": "mlp", "pool": "avg"},
        {"name": "layer2.0.bn2", "k": 5, "head": "bn-softmax", "pool": "avgmax"},
    ]
    (tmp_path / "recipe.json").write_text(Recipe("resnet10t", {}, sites).to_json())
    code, out, err = run("--recipe", str(tmp_path), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [(s["name"], s["k"], s["head"], s["pool"]) for s in data["sites"]] == [
        (s["name"], s["k"], s["head"], s["pool"]) for s in sites
    ]
    assert data["init"] == "paper"
    code, out, err = run("--recipe", str(tmp_path))  # mixed: a column
    assert code == 0 and "head, pool" in out and "bn-softmax, avgmax" in out and "mlp, avg" in out
    code, out, err = run("resnet10t", "--head", "mlp", "--pool", "avg", "--img-size", "32")
    assert code == 0 and "(head and pool mlp, avg, init paper)" in out  # one for all: the title


def test_torchvision_style_and_headless_loads(tmp_path: Path) -> None:
    """Weights without BatchNorm's ``num_batches_tracked`` (torchvision's ImageNet files) load,
    as they do in torch and timm; ``--num-classes 0`` (timm's headless model) drops the file's
    classifier, as timm's pretrained loading does. The model computes what the file's does."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False).eval()
    for m in ref.modules():  # (statistics of their own, so that loading them shows)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    ckpt = tmp_path / "tv.pth"
    torch.save(state, ckpt)
    x = torch.randn(2, 3, 64, 64)
    for extra in ([], ["--num-classes", "0"]):
        out_dir = tmp_path / f"out{len(extra)}"
        code, _, err = run("resnet10t", "--checkpoint", str(ckpt), *extra, "--output", str(out_dir))
        assert code == 0, err
        loaded = an_search.load(out_dir)[0].eval()
        assert bool(extra) == ("fc.weight" not in loaded.state_dict())
        with torch.no_grad():
            want = (
                ref(x) if not extra else ref.forward_head(ref.forward_features(x), pre_logits=True)
            )
            torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-4)


def test_checkpoint_path_messages(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    code, _, err = run("resnet10t", "--num-classes", "10", "--output", str(saved))
    assert code == 0, err
    code, _, err = run("resnet10t", "--checkpoint", str(saved))
    assert code == 2 and "is a directory: pass the weights file in it" in err, err
    code, _, err = run(
        "resnet10t", "--num-classes", "10", "--checkpoint", str(saved / "model.safetensors")
    )
    assert code == 2 and "a saved AN model's weights: give its recipe too" in err, err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    code, _, err = run("resnet10t", "--checkpoint", str(bad))
    reason = err.split("cannot be read (", 1)[1].split("): pass", 1)[0]
    assert code == 2 and len(reason) <= 123 and (not reason.endswith("...") or reason[-4] != " ")


def test_ctrl_c_in_an_convert_says_nothing_was_half_written(tmp_path: Path, monkeypatch) -> None:
    """No "re-run to resume" (nothing resumes): the new output directory is gone."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(an_search, "save", interrupted)
    monkeypatch.setattr("an_search.rewrite.save", interrupted)
    out_dir = tmp_path / "out"
    code, _, err = run("resnet10t", "--output", str(out_dir))
    assert code == 130 and not out_dir.exists()
    assert err.strip().splitlines()[-1] == (
        "error: interrupted; no file was left half-written (re-run the command)"
    )


def test_model_kwargs_build_the_model_and_stay_in_its_recipe(tmp_path: Path) -> None:
    """``--model-kwargs KEY=VALUE`` (repeatable, YAML scalars), as timm's train.py takes them:
    the model is built with them, the recipe keeps them, and the saved model reloads so."""
    code, out, err = run(
        "resnet10t", "--model-kwargs", "global_pool=max", "--model-kwargs",
        "drop_path_rate=1e-1", "--output", str(tmp_path / "m"), "--json",
    )  # fmt: skip
    assert code == 0, err
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["model_kwargs"] == {"global_pool": "max", "drop_path_rate": 0.1}  # (1e-1:
    # a number, which YAML 1.1 alone reads as a string)
    model, _ = an_search.load(tmp_path / "m")
    assert isinstance(model.global_pool.pool, torch.nn.AdaptiveMaxPool2d)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())  # (drop_path_rate)
    code, out, err = run("resnet10t", "--model-kwargs", "act_layer=silu", "--list-sites")
    assert code == 0 and "resnet10t: 14 normalization sites" in out
    for bad, message in [
        ("global_pool", "--model-kwargs 'global_pool' is not KEY=VALUE"),
        ("num_classes=3", "model_kwargs 'num_classes'"),
        ("no_such_option=1", "timm cannot build 'resnet10t' with {'no_such_option': 1}"),
    ]:
        code, out, err = run("resnet10t", "--model-kwargs", bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) <= 3, err


def test_model_kwargs_that_break_the_forward_are_named(tmp_path: Path) -> None:
    """Options timm builds with but whose model cannot run (no pooling before the classifier,
    a dropout over 1) are the options' fault, said so, exit 2 (were an internal error, or
    blamed on the image size); at a size the model cannot take without them, the size is."""
    for bad, reason in [
        ("global_pool=", "mat1 and mat2 shapes cannot be multiplied"),
        ("drop_rate=2", "dropout probability has to be between 0 and 1"),
    ]:
        for size in ([], ["--img-size", "48"]):
            code, out, err = run(
                "resnet10t", "--model-kwargs", bad, *size, "--output", str(tmp_path / "m")
            )
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, err
            assert (
                lines[0].startswith("error: resnet10t built with model_kwargs ") and reason in err
            )
            assert lines[0].endswith("and runs without them: drop or fix these options")
    assert not list(tmp_path.iterdir())
    code, out, err = run(  # (a ViT at 8 px: the size's fault, options or not)
        "vit_tiny_patch16_224", "--model-kwargs", "global_pool=avg", "--img-size", "8"
    )
    assert code == 2 and "give a larger --img-size" in err and "model_kwargs" not in err, err
