"""Search spaces: shipped files, validation errors (rule, then the bad value), sampling."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import timm
import yaml

from an_search.errors import SpaceError
from an_search.rewrite import find_sites
from an_search.search import (
    BASELINES,
    PER_STAGE,
    check_space,
    config_key,
    list_spaces,
    load_space,
    parse_space,
    sample_recipe,
)


@pytest.fixture(scope="module")
def report():  # resnet10t: 4 stages of one BasicBlock, stem norms outside any stage
    return find_sites(timm.create_model("resnet10t", pretrained=False, num_classes=10))


def test_shipped_spaces_load() -> None:
    assert list_spaces() == ["default", "paper-neighbourhood"]
    default = load_space("default")
    assert set(default.placement.values()) >= {"paper", "all", PER_STAGE}
    assert set(default.head.values()) == {
        "default",
        "linear-sigmoid",
        "linear-hsigmoid",
        "mlp",
        "mlp-bn",
        "bn-sigmoid",
        "bn-softmax",
        "gn-hsigmoid",
    }
    assert default.pool.values() == ("meanstd", "avg", "avgmax")
    assert default.k.values() == tuple(range(2, 33, 2))  # type: ignore[union-attr]
    narrow = load_space("paper-neighbourhood")
    assert narrow.placement.values() == ("paper", PER_STAGE)
    assert 10 in narrow.k.values() and 20 in narrow.k.values()  # type: ignore[union-attr]
    assert "description:" in narrow.text


def test_load_by_path_equals_by_name(tmp_path: Path) -> None:
    import search_spaces

    shipped = Path(search_spaces.__file__).parent / "default.yaml"
    copy = tmp_path / "mine.yaml"
    copy.write_text(shipped.read_text())
    assert load_space(copy).placement == load_space("default").placement
    assert load_space(copy).name == "mine"


@pytest.mark.parametrize(
    ("data", "rule", "bad"),
    [
        ({"heads": {"type": "categorical", "choices": ["default"]}}, "unknown key", "'heads'"),
        ({"head": {"type": "categorical", "choices": []}}, "non-empty list", "[]"),
        ({"head": {"type": "categorical"}}, "non-empty list", "None"),
        ({"k": {"type": "int", "low": 8, "high": 4}}, "must not exceed", "low=8 high=4"),
        ({"head": {"type": "categorical", "choices": ["mlpp"]}}, "unknown head", "'mlpp'"),
        ({"head": "nope"}, "unknown head", "'nope'"),
        ({"pool": {"type": "categorical", "choices": ["max"]}}, "unknown pool", "'max'"),
        ({"placement": {"type": "categorical", "choices": ["papr"]}}, "unknown placement", "papr"),
        ({"head": {"type": "categorical", "choice": ["x"]}}, "unknown attribute", "'choice'"),
        ({"head": {"type": "str", "choices": ["default"]}}, "type must be", "'str'"),
        ({"k": {"type": "int", "low": 0, "high": 4}}, "at least 1", "low=0"),
        ({"k": {"type": "float", "low": 1, "high": 4}}, "whole numbers", "float"),
        ({"k": {"type": "int", "low": 2, "high": 9, "step": 2}}, "multiple of step", "2..9/2"),
        ({"k": {"type": "int", "low": 2, "high": 8, "step": 2, "log": True}}, "log", "step=2"),
        ({"k": {"type": "categorical", "choices": [4, 4]}}, "not repeat", "[4, 4]"),
        ({"k": {"type": "categorical", "choices": [4, "x"]}}, "whole numbers", "'x'"),
        ({"k": {"type": "int", "low": 4, "high": 2048}}, "at most 1024", "high=2048"),
        ({"k": {"type": "categorical", "choices": [4, 1025]}}, "at most 1024", "1025"),
        ({"placement": PER_STAGE}, "needs a stage_role", "stage_role missing"),
        (
            {"stage_role": {"type": "categorical", "choices": ["all"]}},
            "only when placement can be",
            "('paper',)",
        ),
        (
            {"placement": PER_STAGE, "stage_role": "none"},
            "at least one configuration with AN",
            "stage_role ['none']",
        ),
        ({"placement": "none"}, "at least one configuration with AN", "['none']"),
        ([1, 2], "mapping", "list"),
    ],
)
def test_invalid_spaces_one_line(data: object, rule: str, bad: str) -> None:
    with pytest.raises(SpaceError) as info:
        parse_space(data)
    message = str(info.value)
    assert "\n" not in message
    assert rule in message and bad in message
    assert message.index(rule) < message.rindex(bad)  # rule first, then the bad value


def test_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("head: [unclosed\n")
    with pytest.raises(SpaceError, match="valid YAML"):
        load_space(broken)
    twice = tmp_path / "twice.yaml"  # YAML would keep the second k silently
    twice.write_text("placement: paper\nk: {type: categorical, choices: [4]}\nk: 8\n")
    with pytest.raises(SpaceError, match=r"valid YAML \(duplicate key 'k'\): .*twice.yaml line 3"):
        load_space(twice)
    for text in ("? [a, b]\n: c\n", "{[a]: 1}\n"):  # a key that is no name
        listed = tmp_path / "listed.yaml"
        listed.write_text(text)
        with pytest.raises(SpaceError, match=r"valid YAML \(a key must be a name, not a list\)"):
            load_space(listed)
    merged = tmp_path / "merged.yaml"  # YAML merge keys: the space is what safe_load reads
    # (the mapping's own keys override merged ones; several anchors may share a key)
    merged.write_text(
        "placement: paper\nk:\n  <<: [{low: 4, shared: true}, {type: int, low: 2, high: 32}]\n"
        "  high: 8\n"
    )
    data = yaml.safe_load(merged.read_text())
    assert data["k"]["high"] == 8 and data["k"]["low"] in (2, 4)
    kwargs = {"name": "merged", "source": str(merged.resolve()), "text": merged.read_text()}
    assert load_space(merged) == parse_space(data, **kwargs)
    with pytest.raises(SpaceError, match="must exist"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(SpaceError, match="shipped name"):
        load_space("no-such-space")


def test_a_null_step_is_the_default_one() -> None:
    """YAML's ``step: null`` (or ``~``) as left out: step 1 for an int (before: an internal
    TypeError from ``(high - low) % None``)."""
    k = {"type": "int", "low": 2, "high": 8}
    assert parse_space({"k": {**k, "step": None}}) == parse_space({"k": k})
    assert parse_space({"k": {**k, "step": None}}).k.dist.step == 1
    assert parse_space({"k": {"per_stage": [{**k, "step": None}] * 4}}) == parse_space(
        {"k": {"per_stage": [k] * 4}}
    )


def test_sample_recipe_presets(report) -> None:
    space = parse_space(
        {
            "placement": "after-3x3",
            "k": {"type": "int", "low": 2, "high": 6, "step": 2},
            "head": {"type": "categorical", "choices": ["mlp", "bn-sigmoid"]},
            "pool": "avg",
        }
    )
    trial = optuna.trial.FixedTrial(
        {"stage0_k": 2, "stage1_k": 4, "stage2_k": 6, "stage3_k": 2, "head": "mlp"}
    )
    config = sample_recipe(trial, space, report)
    assert config == {
        "placement": "after-3x3",
        "k": [2, 4, 6, 2],
        "head": "mlp",
        "pool": "avg",
    }


@pytest.mark.parametrize(
    ("k", "enqueued", "why"),
    [
        ({"type": "int", "low": 2, "high": 32, "step": 2}, 3, "2 to 32 in steps of 2"),
        ({"type": "int", "low": 2, "high": 32, "step": 2}, 1000, "2 to 32 in steps of 2"),
        ({"type": "int", "low": 1, "high": 64, "log": True}, 100, "1 to 64, log scale"),
    ],
)
def test_an_enqueued_number_outside_the_space_is_refused(
    k: dict, enqueued: int, why: str, report, recwarn: pytest.WarningsRecorder
) -> None:
    """Optuna only warns of a fixed value out of range, and takes it: the trial would train a
    configuration the space does not hold. The objective turns the ValueError into the trial's
    fail_reason; a value in the space is taken."""
    space = parse_space({"placement": "paper", "k": {**k, "shared": True}})
    study = optuna.create_study()
    study.enqueue_trial({"k": enqueued})
    with pytest.raises(ValueError, match=f"k={enqueued} is outside the space: {why}$"):
        sample_recipe(study.ask(), space, report)
    assert not [w for w in recwarn if "out of range" in str(w.message)]
    study.enqueue_trial({"k": 4})
    assert sample_recipe(study.ask(), space, report)["k"] == 4


def test_sample_recipe_per_stage_asks_k_only_where_used(report) -> None:
    space = parse_space(
        {
            "placement": PER_STAGE,
            "stage_role": {"type": "categorical", "choices": ["none", "last-in-block", "all"]},
            "k": {"type": "int", "low": 2, "high": 8},
        }
    )
    study = optuna.create_study()
    study.enqueue_trial(
        {
            "stage0_role": "none",
            "stage1_role": "last-in-block",
            "stage2_role": "all",
            "stage3_role": "none",
            "stage1_k": 3,
            "stage2_k": 7,
        }
    )
    trial = study.ask()
    config = sample_recipe(trial, space, report)
    # Independently: layer2.0.bn2 is stage 1's last norm; stage 2 has bn1, bn2 and downsample.
    assert config["placement"] == "none"
    assert config["include"] == [
        "layer2.0.bn2",
        "layer3.0.bn1",
        "layer3.0.bn2",
        "layer3.0.downsample.2",
    ]
    assert config["k"] == [10, 3, 7, 20]  # unused stages keep the paper's K
    assert set(trial.params) == {f"stage{i}_role" for i in range(4)} | {"stage1_k", "stage2_k"}


def test_per_stage_all_none_is_the_unconverted_model(report) -> None:
    space = parse_space(
        {"placement": PER_STAGE, "stage_role": {"type": "categorical", "choices": ["none", "all"]}}
    )
    trial = optuna.trial.FixedTrial({f"stage{i}_role": "none" for i in range(4)})
    assert sample_recipe(trial, space, report) == BASELINES["bn"]


def test_check_space_against_the_model(report) -> None:
    check_space(load_space("default"), report)
    check_space(load_space("paper-neighbourhood"), report)
    with pytest.raises(SpaceError, match=r"one parameter per stage of the model \(4\): 2"):
        check_space(parse_space({"k": {"per_stage": [4, 8]}}), report)
    with pytest.raises(SpaceError, match="selects none"):
        check_space(parse_space({"placement": "after-depthwise"}), report)
    with pytest.raises(SpaceError, match="norm kind of this model"):
        check_space(parse_space({"base": "layernorm"}), report)


def test_config_key_names_the_model_not_the_parameters() -> None:
    site = {"name": "layer1.0.bn1", "k": 4, "head": "default", "pool": "meanstd"}
    other = {**site, "name": "layer2.0.bn1"}
    a = {"sites": [site, other], "init": "paper"}
    b = {"sites": [other, site], "init": "paper"}
    assert config_key(a) == config_key(b)
    assert config_key(a) != config_key({"sites": [site], "init": "paper"})
    assert config_key(a) != config_key({"sites": [{**site, "k": 5}, other], "init": "paper"})
    assert config_key({"sites": [], "init": "paper"}) == config_key({"sites": [], "init": "x"})


def test_every_shipped_yaml_is_plain_data() -> None:
    import search_spaces

    for path in Path(search_spaces.__file__).parent.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and data.get("description"), path.name


def test_an_enqueued_fraction_or_unknown_name_is_refused(report) -> None:
    """``suggest_int`` takes int() of an enqueued 4.5 (the trial would train K=4), and Optuna
    ignores a name the space never asks for (``k`` where K is per stage: other values were
    sampled): both are refused, as numbers outside the space are."""
    per_stage = parse_space({"placement": "paper", "k": {"type": "int", "low": 2, "high": 8}})
    study = optuna.create_study()
    study.enqueue_trial({"stage0_k": 4.5})
    with pytest.raises(ValueError, match=r"stage0_k=4.5 is outside the space: 2 to 8"):
        sample_recipe(study.ask(), per_stage, report)
    study.enqueue_trial({"k": 4})
    with pytest.raises(ValueError, match=r"'k' is not a parameter of space .*stage0_k"):
        sample_recipe(study.ask(), per_stage, report)
    study.enqueue_trial({"stage0_k": 4})
    assert sample_recipe(study.ask(), per_stage, report)["k"][0] == 4


def test_an_enqueued_value_for_what_the_space_fixes_is_refused(report) -> None:
    """A value the space fixes (``head: mlp``) is never asked of the trial, so Optuna would
    not see an enqueued other one: the trial would train the space's, its fixed_params saying
    otherwise. Refused as a value outside the space; the fixed value itself is taken."""
    space = parse_space(
        {"placement": "paper", "head": "mlp", "k": {"type": "int", "low": 3, "high": 7,
         "shared": True}}
    )  # fmt: skip
    study = optuna.create_study()
    study.enqueue_trial({"head": "default", "k": 3})
    with pytest.raises(ValueError, match=r"head='default' is outside the space: it fixes head"):
        sample_recipe(study.ask(), space, report)
    study.enqueue_trial({"head": "mlp", "k": 5})
    assert sample_recipe(study.ask(), space, report) == {
        "placement": "paper", "k": 5, "head": "mlp", "pool": "meanstd"
    }  # fmt: skip


@pytest.mark.parametrize("init", ["preserve", {"type": "categorical", "choices": ["preserve"]}])
def test_the_paper_baseline_starts_as_the_space_fixes_init(init: object) -> None:
    """``init: preserve`` and a categorical of that one choice fix it alike: the paper baseline
    starts so too (the README: "the space's init where it fixes one"), as the trials do."""
    from types import SimpleNamespace

    from an_search.search.objective import Objective

    space = parse_space({"placement": "paper", "init": init})
    config = Objective._config(SimpleNamespace(space=space), None, "paper")  # type: ignore[arg-type]
    assert config == {"placement": "paper", "init": "preserve"}
    free = parse_space({"init": {"type": "categorical", "choices": ["paper", "preserve"]}})
    assert "init" not in Objective._config(SimpleNamespace(space=free), None, "paper")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"type": "int", "low": "a", "high": 3}, "k.low must be an integer: 'a'"),
        ({"type": "int", "low": 1, "high": 3, "step": 0}, "k.step must be a positive integer: 0"),
    ],
)
def test_a_bad_int_range_is_named_in_words(raw: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=f"^{message}$"):
        parse_space({"k": raw})
