"""``an_search.convert`` of a built model: what the caller asked for happens, and the recipe
rebuilds the model (``load`` of what ``save`` wrote gives the same outputs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import an_search
from an_search.errors import CheckpointError, ModelConfigError, RecipeError
from an_search.layers import AttentiveNorm


def _round_trip(model: nn.Module, recipe: an_search.rewrite.Recipe, tmp_path: Path) -> None:
    """Save, load, and compare state dicts and eval outputs bit for bit."""
    an_search.save(model, recipe, tmp_path / "out")
    loaded, _ = an_search.load(tmp_path / "out")
    model.eval()
    own = model.state_dict()
    assert loaded.state_dict().keys() == own.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, own[key]), key
    channels = model.get_submodule("conv1.0").in_channels
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"num_classes": 10}, {"in_chans": 1}])
def test_built_with_other_kwargs_round_trips(kwargs: dict, tmp_path: Path) -> None:
    net = timm.create_model("resnet10t", pretrained=False, **kwargs)
    result = an_search.convert(net, cost=False)
    key = next(iter(kwargs))
    assert result.recipe.model_kwargs[key] == kwargs[key]
    _round_trip(result.model, result.recipe, tmp_path)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_a_space_to_depth_stem_counts_the_images_channels(in_chans: int, tmp_path: Path) -> None:
    """TResNet's first_conv takes 16 x the image's channels (SpaceToDepth folds 4 x 4 pixels
    into channels): the recipe must say the image's, or it rebuilds another model."""
    net = timm.create_model("tresnet_m", pretrained=False, in_chans=in_chans, num_classes=10)
    assert net.get_submodule(net.pretrained_cfg["first_conv"]).in_channels == 16 * in_chans
    result = an_search.convert(net, placement="paper", in_chans=in_chans, cost=False)
    assert result.recipe.model_kwargs["in_chans"] == in_chans
    an_search.save(result.model, result.recipe, tmp_path / "out")
    loaded, _ = an_search.load(tmp_path / "out")
    x = torch.randn(1, in_chans, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), result.model.eval()(x), rtol=0, atol=0)


def test_a_space_to_depth_checkpoints_channels_are_named_as_the_images(tmp_path: Path) -> None:
    """A TResNet checkpoint of 3-channel images into a 1-channel model: the hint names the
    image's channels (before: in_chans=48, its conv's, which fails the same way again)."""
    from an_search.errors import CheckpointError
    from an_search.models import create_model

    ckpt = tmp_path / "t.safetensors"
    net = timm.create_model("tresnet_m", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt))
    with pytest.raises(CheckpointError, match=r"; pass in_chans=3 \(the checkpoint's input"):
        create_model("tresnet_m", num_classes=10, in_chans=1, checkpoint=ckpt)


def test_converting_a_converted_model_keeps_its_sites(tmp_path: Path) -> None:
    net = an_search.convert("resnet10t", placement="paper", head="mlp", cost=False).model
    first = {n: (m.k, m.head_name) for n, m in net.named_modules() if isinstance(m, AttentiveNorm)}
    result = an_search.convert(net, placement="all", k=3, head="default", cost=False)
    sites = {s.name: (s.k, s.head) for s in result.recipe.sites}
    assert {n: sites[n] for n in first} == first  # the earlier sites, with their own K and head
    converted = {n for n, m in net.named_modules() if isinstance(m, AttentiveNorm)}
    assert set(sites) == converted and len(converted) > len(first)
    _round_trip(result.model, result.recipe, tmp_path)


def test_checkpoint_and_num_classes_apply_to_a_built_model(tmp_path: Path) -> None:
    source = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(ckpt))
    net = timm.create_model("resnet10t", pretrained=False)  # 1000 classes, other weights
    result = an_search.convert(net, checkpoint=ckpt, num_classes=7, cost=False)
    assert net.num_classes == 7 and result.recipe.model_kwargs["num_classes"] == 7
    assert result.recipe.init == "preserve"
    assert torch.equal(net.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(net.fc.weight, source.fc.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # init preserve: the converted model computes what the source did
        torch.testing.assert_close(net.eval()(x), source.eval()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="does not exist"):
        an_search.convert(timm.create_model("resnet10t"), checkpoint=tmp_path / "no.pth")


def test_refusals_leave_the_model_unchanged() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(RecipeError, match="no timm name"):
        an_search.convert(plain, cost=False)
    assert isinstance(plain[1], nn.BatchNorm2d)
    net = timm.create_model("resnet10t", pretrained=False)
    with pytest.raises(ModelConfigError, match="takes 3 input channels"):
        an_search.convert(net, in_chans=1, cost=False)
    assert not any(isinstance(m, AttentiveNorm) for m in net.modules())
    folded = an_search.fold_sites(an_search.convert("resnet10t", cost=False).model.eval())
    with pytest.raises(ModelConfigError, match="folded"):
        an_search.convert(folded, placement="all", cost=False)


def test_checkpoints_load_as_timm_loads_pretrained_weights(tmp_path: Path) -> None:
    """A 224-pixel ViT checkpoint into a 32-pixel model (position embeddings resampled by the
    model's checkpoint_filter_fn), RGB weights into a 1-channel model (adapt_input_conv)."""
    from timm.layers import resample_abs_pos_embed

    from an_search.models import create_model

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    ckpt = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(ckpt))
    small = create_model("vit_tiny_patch16_224", img_size=32, checkpoint=ckpt)
    expected = resample_abs_pos_embed(vit.pos_embed, new_size=(2, 2), num_prefix_tokens=1)
    assert small.pos_embed.shape == (1, 5, 192)
    torch.testing.assert_close(small.pos_embed, expected)
    assert torch.equal(small.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)

    rgb = timm.create_model("resnet10t", pretrained=False)
    ckpt = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(ckpt))
    gray = create_model("resnet10t", in_chans=1, checkpoint=ckpt)
    stem = rgb.conv1[0].weight
    torch.testing.assert_close(gray.conv1[0].weight, stem.sum(dim=1, keepdim=True))
    assert torch.equal(gray.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)


def test_convert_recipe_rebuilds_a_conversion_and_moves_it_to_a_pretrained_model(
    tmp_path: Path,
) -> None:
    """A searched recipe (10 classes, 32 px) put into a 1000-class model with local weights:
    the same sites, K and heads; the classifier and image size given; AN starts as the
    pretrained norm (eval outputs equal the unconverted model's)."""
    torch.manual_seed(0)
    searched = an_search.convert(
        "resnet10t", placement="last-in-block", k=[3, 4, 5, 6], head="bn-softmax",
        num_classes=10, img_size=32,
    )  # fmt: skip
    again = an_search.convert_recipe(searched.recipe)
    assert again.selected == searched.selected and again.recipe == searched.recipe
    assert again.cost_after.params == searched.cost_after.params
    assert again.cost_after.macs == searched.cost_after.macs
    assert again.input_size == (3, 32, 32)

    pretrained = timm.create_model("resnet10t", pretrained=False).eval()
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(ckpt))
    moved = an_search.convert_recipe(
        searched.recipe, model="resnet10t.c3_in1k", num_classes=1000, img_size=64,
        checkpoint=ckpt,
    )  # fmt: skip
    assert moved.selected == searched.selected and moved.recipe.init == "preserve"
    assert moved.recipe.model == "resnet10t.c3_in1k"
    assert moved.recipe.model_kwargs == {"num_classes": 1000, "img_size": 64}
    assert moved.input_size == (3, 64, 64)
    heads = {n: (m.k, m.head_name) for n, m in moved.model.named_modules()
             if isinstance(m, AttentiveNorm)}  # fmt: skip
    assert heads == {n: (k, "bn-softmax") for n, k in searched.selected.items()}
    # the sites add what they added to the searched model (same channels, K and heads)
    added = moved.cost_after.params - moved.cost_before.params
    assert added == searched.cost_after.params - searched.cost_before.params
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(moved.model.eval()(x), pretrained(x), rtol=1e-4, atol=1e-4)
    _round_trip(moved.model, moved.recipe, tmp_path)


def test_convert_recipe_refuses_another_architecture() -> None:
    """resnet18's sites are resnet34's too: a resnet18 recipe converted half of resnet34's
    sites, silently. A pretrained tag is the same architecture."""
    recipe = an_search.convert("resnet18", num_classes=10, cost=False).recipe
    for other in ("resnet34", "mobilenetv3_small_050", "resnet34.a1_in1k"):
        arch = other.split(".")[0]
        with pytest.raises(RecipeError, match=f"^the recipe converts resnet18, not {arch}: "):
            an_search.convert_recipe(recipe, model=other, cost=False)
    tagged = an_search.convert_recipe(recipe, model="resnet18.a1_in1k", cost=False)
    assert tagged.selected == recipe.site_k()


@pytest.mark.parametrize("saved", ["plain", "converted"])
def test_convert_recipe_reads_its_checkpoint_once(
    saved: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Telling plain weights from a saved AN model's does not read the file a second time;
    either kind still loads (the model's weights are the file's)."""
    import timm.models

    recipe = an_search.convert("resnet10t", placement="last-in-block", num_classes=10).recipe
    source = (
        timm.create_model("resnet10t", num_classes=10)
        if saved == "plain"
        else an_search.convert_recipe(recipe).model
    )
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(ckpt))
    reads: list[str] = []
    real = timm.models.load_state_dict

    def counted(path: str, *args: object, **kwargs: object) -> object:
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(timm.models, "load_state_dict", counted)
    result = an_search.convert_recipe(recipe, checkpoint=ckpt, num_classes=10)
    assert reads == [str(ckpt)]
    got = result.model.state_dict()
    shared = [k for k in source.state_dict() if k in got and "num_batches" not in k]
    assert len(shared) > 20
    for key in shared if saved == "converted" else [k for k in shared if k.startswith("fc.")]:
        assert torch.equal(got[key], source.state_dict()[key]), key


def test_subpackages_are_attributes_of_a_fresh_import() -> None:
    """``import an_search`` then ``an_search.search.run_search`` (as the README writes it), in a
    process that has imported nothing else of the package."""
    code = (
        "import an_search\n"
        "print(an_search.search.run_search.__name__, an_search.train.resolve_data.__name__,\n"
        "      an_search.rewrite.read_recipe.__name__, an_search.errors.ANSearchError.__name__)\n"
        "try:\n    an_search.nothing\nexcept AttributeError as e:\n    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.splitlines() == [
        "run_search resolve_data read_recipe ANSearchError",
        "module 'an_search' has no attribute 'nothing'",
    ]


def test_a_checkpoint_without_a_classifier_needs_num_classes(tmp_path: Path) -> None:
    """A headless model's weights (``num_classes=0``) into a model with a classifier: refused,
    as timm's strict load refuses them, rather than a random classifier loaded silently."""
    from an_search.models import create_model

    headless = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    ckpt = tmp_path / "headless.safetensors"
    save_file({k: v.contiguous() for k, v in headless.state_dict().items()}, str(ckpt))
    with pytest.raises(CheckpointError, match=r"has no classifier \(fc\.\w+ missing.*num_classes"):
        create_model("resnet10t", checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="has no classifier"):
        an_search.convert("resnet10t", checkpoint=ckpt, cost=False)
    for classes in (0, 7):  # none, or a new one: the body is the file's
        model = create_model("resnet10t", num_classes=classes, checkpoint=ckpt)
        assert torch.equal(model.layer1[0].conv1.weight, headless.layer1[0].conv1.weight)


def test_a_training_checkpoint_of_pytorchs_tutorial_layout_loads(tmp_path: Path) -> None:
    """``{"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": 3}`` (DDP's "module."
    prefixes too): its one state_dict is the weights (before: "holds no state_dict of tensors:
    save model.state_dict()", which it had). Two state_dicts: which one is not guessed."""
    from an_search.models import read_checkpoint

    net = timm.create_model("resnet10t")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    ckpt = tmp_path / "tutorial.pth"
    torch.save(
        {"model_state_dict": state, "optimizer_state_dict": opt.state_dict(), "epoch": 3}, ckpt
    )
    read = read_checkpoint(ckpt)
    assert read.keys() == net.state_dict().keys()
    assert all(torch.equal(read[k], v) for k, v in net.state_dict().items())
    torch.save({"student": state, "teacher": state, "epoch": 3}, two := tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"holds 2 state_dicts \('student', 'teacher'\)"):
        read_checkpoint(two)


def test_unreadable_checkpoints_say_why(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """Each file that is no state_dict of tensors gets its own reason and fix, and no torch
    warning about the file comes before the error."""
    import pickle

    from an_search.models import read_checkpoint

    state = {k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}
    named_pth, named_st = tmp_path / "st.pth", tmp_path / "torch.safetensors"
    save_file(state, str(named_pth))
    torch.save(state, named_st)
    torch.save([torch.zeros(2)], listed := tmp_path / "list.pth")
    torch.save(nn.Linear(2, 2), whole := tmp_path / "model.pth")
    (raw := tmp_path / "raw.pkl").write_bytes(pickle.dumps(state, protocol=4))
    (text := tmp_path / "notes.pth").write_text("garbage bytes")  # (was: "it holds Python
    # objects besides tensors, which weights_only loading refuses")
    (empty := tmp_path / "empty.pth").write_bytes(b"")
    no_file = "is no weights file: it starts as neither torch.save's files .* nor a safetensors"
    cases = [
        (text, no_file),
        (empty, no_file),
        (named_pth, "is a safetensors file, and files are read by their name: rename it to end"),
        (named_st, "is a torch file, and files are read by their name: rename it .pth"),
        (listed, "holds no state_dict of tensors: save model.state_dict()"),
        (whole, "holds Python objects besides tensors.*save model.state_dict()"),
        (raw, "save model.state_dict\\(\\) with torch.save"),
    ]
    for path, needle in cases:
        with pytest.raises(CheckpointError, match=needle):
            read_checkpoint(path)
    assert not [str(w.message) for w in recwarn if "pickle" in str(w.message).lower()]
    assert read_checkpoint(named_pth.rename(tmp_path / "st.safetensors")).keys() == state.keys()


def test_convert_recipe_names_an_an_checkpoint_of_another_recipe(tmp_path: Path) -> None:
    """A saved AN model's weights with a recipe of other K: the sites differ, and the fix is
    the recipe the weights were saved with (not "give its recipe too")."""
    saved = an_search.convert("resnet10t", placement="paper", k=4, num_classes=10, cost=False)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in saved.model.state_dict().items()}, str(ckpt))
    other = an_search.convert("resnet10t", placement="paper", num_classes=10, cost=False).recipe
    with pytest.raises(CheckpointError) as info:
        an_search.convert_recipe(other, checkpoint=ckpt)
    message = str(info.value)
    assert "holds AttentiveNorm sites, not this recipe's (layer1.0.bn1." in message
    assert "(4, 64) stored, (10, 64) in the recipe's" in message
    assert message.endswith("give the recipe its weights were saved with")
    same = an_search.convert_recipe(saved.recipe, checkpoint=ckpt, cost=False).model.state_dict()
    assert all(torch.equal(same[k], v) for k, v in saved.model.state_dict().items())


def test_convert_recipe_names_an_an_checkpoint_of_more_sites(tmp_path: Path) -> None:
    """The weights of a model with AN at every site, a recipe with AN at some: its sites are
    there, the others too (before: "a saved AN model's weights: give its recipe too", when the
    recipe was given)."""
    saved = an_search.convert("resnet10t", placement="all", k=2, num_classes=10, cost=False)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in saved.model.state_dict().items()}, str(ckpt))
    fewer = an_search.convert("resnet10t", placement="paper", k=2, num_classes=10, cost=False)
    extra = sorted(set(saved.selected) - set(fewer.selected))
    with pytest.raises(CheckpointError) as info:
        an_search.convert_recipe(fewer.recipe, checkpoint=ckpt)
    message = str(info.value)
    assert f"holds AttentiveNorm sites, not this recipe's (site {extra[0]} stored, " in message
    assert message.endswith("give the recipe its weights were saved with")


def test_convert_recipe_rebuilds_a_saved_vit_at_its_own_size(tmp_path: Path) -> None:
    """A saved 64-pixel AN ViT re-headed through its recipe keeps its 64 pixels (its position
    embeddings as saved), not resampled to timm's 224."""
    vit = an_search.convert("vit_tiny_patch16_224", img_size=64, cost=False)
    an_search.save(vit.model, vit.recipe, tmp_path / "vit")
    ckpt = tmp_path / "vit" / "model.safetensors"
    moved = an_search.convert_recipe(vit.recipe, checkpoint=ckpt, num_classes=10, cost=False)
    assert moved.input_size == (3, 64, 64)
    assert moved.recipe.model_kwargs == {"img_size": 64, "num_classes": 10}
    assert torch.equal(moved.model.pos_embed, vit.model.pos_embed)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = vit.model.eval().forward_head(vit.model.forward_features(x), pre_logits=True)
        mine = moved.model.eval().forward_head(moved.model.forward_features(x), pre_logits=True)
    assert torch.equal(mine, features)


def test_a_seeded_conversion_repeats_and_keeps_the_callers_random_state() -> None:
    """``seed`` fixes the model's init and AN's, by name and by recipe; the caller's torch
    stream goes on as if the call had not run."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = an_search.convert("resnet10t", img_size=32, cost=False, seed=3)
    assert torch.equal(torch.rand(3), expected)
    again = an_search.convert("resnet10t", img_size=32, cost=False, seed=3).model.state_dict()
    other = an_search.convert("resnet10t", img_size=32, cost=False, seed=4).model.state_dict()
    state = first.model.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state)
    by_recipe = [
        an_search.convert_recipe(first.recipe, cost=False, seed=3).model.state_dict()
        for _ in range(2)
    ]
    assert all(torch.equal(by_recipe[0][k], by_recipe[1][k]) for k in state)


@pytest.mark.parametrize(
    ("options", "differs"),
    [({"global_pool": "max"}, nn.AdaptiveMaxPool2d), ({"output_stride": 16}, None),
     ({"act_layer": "silu"}, nn.SiLU)],
    ids=["global_pool", "output_stride", "act_layer"],
)  # fmt: skip
def test_a_model_built_with_other_timm_options_saves_only_with_them(
    options: dict, differs: type | None, tmp_path: Path
) -> None:
    """Options that change what a model computes but not its weights' shapes: ``save`` of a
    built model whose recipe would rebuild the default one is refused (before: it reloaded
    as the default model, silently other outputs); given as ``model_kwargs`` they are kept,
    with the built model or its name, and ``load`` computes what was saved."""
    x = torch.randn(2, 3, 64, 64)
    built = timm.create_model("resnet10t", pretrained=False, **options)
    result = an_search.convert(built, placement="paper", cost=False, seed=0)
    with pytest.raises(RecipeError, match="the recipe does not rebuild this model") as info:
        an_search.save(result.model, result.recipe, tmp_path / "refused")
    assert "here," in str(info.value) and "model_kwargs={...}" in str(info.value)
    assert not (tmp_path / "refused").exists()
    for source in (timm.create_model("resnet10t", pretrained=False, **options), "resnet10t"):
        result = an_search.convert(source, cost=False, seed=0, model_kwargs=options)
        assert options.items() <= result.recipe.model_kwargs.items()
        if differs is not None:
            assert any(isinstance(m, differs) for m in result.model.modules())
        out = an_search.save(result.model, result.recipe, tmp_path / "kept")
        loaded, recipe = an_search.load(out)
        assert options.items() <= recipe.model_kwargs.items()
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), result.model.eval()(x), rtol=0, atol=0)


def test_model_kwargs_that_convert_takes_or_a_recipe_cannot_keep_are_refused() -> None:
    with pytest.raises(ModelConfigError, match="model_kwargs 'num_classes': give num_classes"):
        an_search.convert("resnet10t", cost=False, model_kwargs={"num_classes": 3})
    with pytest.raises(ModelConfigError, match="model_kwargs 'pretrained'"):
        an_search.convert("resnet10t", cost=False, model_kwargs={"pretrained": True})
    with pytest.raises(ModelConfigError, match="is not JSON-able"):
        an_search.convert("resnet10t", cost=False, model_kwargs={"act_layer": nn.SiLU})


def test_what_only_training_sees_does_not_stop_a_save(tmp_path: Path) -> None:
    """SyncBatchNorm for DDP (``convert_sync_batchnorm``) and a norm's momentum change no
    evaluation: such a model saves, and reloads to the same outputs."""
    from an_search.layers import convert_sync_batchnorm

    result = an_search.convert("resnet10t", cost=False, seed=0)
    model = convert_sync_batchnorm(result.model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.momentum = 0.01
    out = an_search.save(model, result.recipe, tmp_path / "m")
    loaded, _ = an_search.load(out)
    x = torch.randn(2, 3, 32, 32)
    plain = an_search.convert("resnet10t", cost=False, seed=0).model
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), plain.eval()(x), rtol=0, atol=0)
