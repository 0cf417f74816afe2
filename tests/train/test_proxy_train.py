"""proxy_train on real timm models: results, determinism, pruning, NaN, checkpoint and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from an_search.errors import CheckpointError, NonFiniteLossError, TrainConfigError
from an_search.train import TrainConfig, load_checkpoint, proxy_train, resolve_data

# One thread: on a shared 2-core machine a second OpenMP thread mostly waits for a core.
TINY = TrainConfig(epochs=1, batches_per_epoch=3, batch_size=16, threads=1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=10)


def test_embedded_run_returns_accuracy_and_history() -> None:
    calls: list[tuple[int, int]] = []
    cfg = TrainConfig(epochs=1, batches_per_epoch=5, batch_size=16, val_fraction=0.1, threads=1)
    result = proxy_train(
        _model(), resolve_data(None), cfg, progress=lambda done, total: calls.append((done, total))
    )
    assert 0.0 <= result.top1 <= 100.0 and result.top1 <= result.top5 <= 100.0
    assert result.steps == 5 and calls == [(i, 5) for i in range(1, 6)]
    (record,) = result.history
    assert record["epoch"] == 1 and record["top1"] == result.top1
    assert math.isfinite(record["train_loss"]) and record["wall_s"] > 0
    assert result.stopped_early is None


def test_same_seed_same_accuracy(tiny_root: Path) -> None:
    spec = resolve_data(tiny_root)
    a = proxy_train(_model(), spec, TINY)
    b = proxy_train(_model(), spec, TINY)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.top1 == b.top1


def test_on_epoch_true_stops_after_first_epoch(tiny_root: Path) -> None:
    seen: list[tuple[int, float, float]] = []

    def prune(epoch: int, top1: float, top5: float) -> bool:
        seen.append((epoch, top1, top5))
        return True

    cfg = TrainConfig(epochs=3, batches_per_epoch=2, batch_size=16, threads=1)
    result = proxy_train(_model(), resolve_data(tiny_root), cfg, on_epoch=prune)
    assert [s[0] for s in seen] == [1] and len(result.history) == 1
    assert result.steps == 2 and "epoch 1" in result.stopped_early


class _NaNAfterStem(nn.Module):
    """A real timm model whose logits turn NaN: the non-finite check must fire on update 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * float("nan")


@pytest.mark.parametrize("case", ["nan-model", "huge-lr"])
def test_non_finite_loss_stops(tiny_root: Path, case: str) -> None:
    model, cfg = _NaNAfterStem(), TINY
    if case == "huge-lr":  # one update with lr 1e30 blows the weights up
        cfg = TrainConfig(epochs=1, batch_size=16, lr=1e30, warmup_epochs=0, threads=1)
        model = _model()
    with pytest.raises(NonFiniteLossError, match="lower the learning rate") as err:
        proxy_train(model, resolve_data(tiny_root), cfg)
    assert err.value.epoch == 1 and err.value.step >= 1
    if case == "nan-model":
        assert err.value.step == 1


def test_resume_continues_exactly(tiny_root: Path, tmp_path: Path) -> None:
    spec = resolve_data(tiny_root)
    base = {"epochs": 2, "batches_per_epoch": 2, "batch_size": 16, "threads": 1}
    straight = proxy_train(_model(), spec, TrainConfig(**base))

    ckpt = str(tmp_path / "ckpt")
    first = proxy_train(
        _model(), spec, TrainConfig(**base, checkpoint_dir=ckpt), on_epoch=lambda *a: True
    )
    assert first.steps == 2 and load_checkpoint(ckpt)["epoch"] == 1
    resume = TrainConfig(**base, checkpoint_dir=ckpt, resume=True)
    resumed = proxy_train(_model(seed=1), spec, resume)  # other init: weights come from ckpt
    assert [h["epoch"] for h in resumed.history] == [1, 2] and resumed.steps == 4
    assert resumed.history[0] == first.history[0]
    assert resumed.top1 == straight.top1
    assert resumed.history[1]["train_loss"] == straight.history[1]["train_loss"]
    assert load_checkpoint(ckpt)["epoch"] == 2
    # its time is the whole training's: the restored epoch's seconds too
    assert resumed.wall_s >= resumed.history[0]["wall_s"] + resumed.history[1]["wall_s"]


def test_resume_refuses_other_schedule(tiny_root: Path, tmp_path: Path) -> None:
    spec, ckpt = resolve_data(tiny_root), str(tmp_path)
    proxy_train(
        _model(),
        spec,
        TrainConfig(epochs=1, batches_per_epoch=1, batch_size=16, threads=1, checkpoint_dir=ckpt),
    )
    with pytest.raises(CheckpointError, match="epochs=1"):
        proxy_train(
            _model(),
            spec,
            TrainConfig(
                epochs=2, batches_per_epoch=1, batch_size=16, checkpoint_dir=ckpt, resume=True
            ),
        )


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"lr": 0.001}, "lr=0.4"), ({"img_size": 48}, "img_size=32"), ({"opt": "adamw"}, "opt='sgd'")],
)
def test_resume_refuses_any_setting_the_result_depends_on(
    change: dict, needle: str, tiny_root: Path, tmp_path: Path
) -> None:
    """A resumed optimizer and scheduler keep the checkpoint's lr: another --lr would be
    recorded as used, and not be (so would any other training setting)."""
    spec, ckpt = resolve_data(tiny_root), str(tmp_path)
    base = {"epochs": 2, "batches_per_epoch": 1, "batch_size": 16, "checkpoint_dir": ckpt}
    proxy_train(_model(), spec, TrainConfig(**base, threads=1), on_epoch=lambda *a: True)
    with pytest.raises(CheckpointError, match=needle):
        proxy_train(_model(), spec, TrainConfig(**base, **change, resume=True))


def test_resume_refuses_a_checkpoint_of_another_process_count(
    tiny_root: Path, tmp_path: Path
) -> None:
    """The global batch and the lr (scaled with it) follow the processes: a checkpoint that two
    torchrun processes saved, resumed by one, would go on at twice this run's lr (the resumed
    scheduler's) and half its batch; before, nothing was stored to notice it by."""
    from an_search.train.checkpoint import save_checkpoint

    spec, ckpt = resolve_data(tiny_root), str(tmp_path)
    base = {"epochs": 2, "batches_per_epoch": 1, "batch_size": 16, "checkpoint_dir": ckpt}
    proxy_train(_model(), spec, TrainConfig(**base, threads=1), on_epoch=lambda *a: True)
    saved = load_checkpoint(ckpt)
    assert saved["processes"] == 1
    save_checkpoint(ckpt, {**saved, "processes": 2})
    with pytest.raises(CheckpointError, match=r"saved by a run of 2 processes, this one has 1 "):
        proxy_train(_model(), spec, TrainConfig(**base, threads=1, resume=True))
    save_checkpoint(ckpt, {k: v for k, v in saved.items() if k != "processes"})  # (older)
    assert len(proxy_train(_model(), spec, TrainConfig(**base, resume=True)).history) == 2


def test_an_ema_is_saved_where_timms_loaders_take_it(tiny_root: Path, tmp_path: Path) -> None:
    """timm's key (``model_ema``): ``an-convert --checkpoint last.pth`` loads the EMA, as it
    does a timm training checkpoint's (before: under "ema", which no loader knew, so the raw
    weights were taken without a word); a resume restores it."""
    from an_search.models import read_checkpoint

    spec, ckpt = resolve_data(tiny_root), str(tmp_path)
    base = {"epochs": 2, "batches_per_epoch": 2, "batch_size": 16, "threads": 1}
    straight = proxy_train(_model(), spec, TrainConfig(**base, ema_decay=0.5))
    cut = TrainConfig(**base, ema_decay=0.5, checkpoint_dir=ckpt)
    proxy_train(_model(), spec, cut, on_epoch=lambda *a: True)
    saved = load_checkpoint(ckpt)
    read = read_checkpoint(tmp_path / "last.pth")
    assert read.keys() == saved["model_ema"].keys()
    assert all(torch.equal(read[k], saved["model_ema"][k]) for k in read)
    differ = [k for k in read if not torch.equal(read[k], saved["model"][k])]
    assert differ  # (the EMA is not the raw weights)
    resume = TrainConfig(**base, ema_decay=0.5, checkpoint_dir=ckpt, resume=True)
    resumed = proxy_train(_model(seed=1), spec, resume)
    assert resumed.history[1]["ema_top1"] == straight.history[1]["ema_top1"]
    plain = str(tmp_path / "plain")
    proxy_train(_model(), spec, TrainConfig(**base, checkpoint_dir=plain))
    assert "model_ema" not in load_checkpoint(plain)  # (timm would take an empty one)


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "last.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "empty") is None


def test_ema_is_validated(tiny_root: Path) -> None:
    cfg = TrainConfig(epochs=1, batches_per_epoch=2, batch_size=16, ema_decay=0.9, threads=1)
    result = proxy_train(_model(), resolve_data(tiny_root), cfg)
    assert 0.0 <= result.history[0]["ema_top1"] <= 100.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("train_fraction", 1.5), ("batch_size", 1), ("resume", True)],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(TrainConfigError, match=field):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"opt": "adamw_typo"}, "opt 'adamw_typo' cannot be built by timm"),
        ({"sched": "cosin"}, "sched 'cosin' cannot be built by timm (Unknown scheduler"),
        ({"sched": "plateau"}, "sched 'plateau' cannot be built by timm"),  # (steps per epoch)
        ({"min_lr": -1.0}, "min_lr must be 0 or more, got -1.0"),
        ({"momentum": "x"}, "momentum must be a number, got 'x'"),
        ({"batches_per_epoch": 1.5}, "batches_per_epoch must be None or an integer, got 1.5"),
        ({"epochs": "2"}, "epochs must be an integer, got '2'"),
        ({"scale": (-1.0, 0.5)}, "scale must be (low, high) with 0 < low <= high"),
        ({"scale": (1.0, 0.5)}, "scale must be (low, high) with 0 < low <= high"),
        ({"scale": 0.5}, "scale must be a pair of numbers"),
        ({"hflip": 2.0}, "hflip must be in [0, 1], got 2.0"),
        ({"weight_decay": -1.0}, "weight_decay must be 0 or more"),
        ({"warmup_lr": -1.0}, "warmup_lr must be 0 or more"),
        ({"threads": 0}, "threads must be None or at least 1, got 0"),
        ({"amp": "yes"}, "amp must be True or False"),
        ({"ema_decay": "0.9"}, "ema_decay must be None or a number"),
    ],
)
def test_settings_that_used_to_fail_inside_training_are_refused_up_front(
    settings: dict, message: str
) -> None:
    """Each of these failed only when training began (timm's factories, islice, torch), with
    a raw ValueError, AssertionError or TypeError; or, for the ranges, ran silently."""
    with pytest.raises(TrainConfigError) as info:
        TrainConfig(**settings).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_top1_is_a_count_of_right_images_not_a_sum_of_float_percentages() -> None:
    """Top-1 and top-5 are 100 * right / images, exactly: two models right on the same images
    score the same to the last bit (before, float32 batch percentages summed to 35.49999996
    and 35.50000008 for 71 of 200, and a delta against the baseline of 1.1e-07)."""
    from contextlib import nullcontext

    from an_search.train.proxy import _evaluate

    gen = torch.Generator().manual_seed(0)
    batches, right1, right5, images = [], 0, 0, 0
    for size in (7, 3, 11, 9, 13, 6):  # logits (B, 10): the inputs themselves
        x = torch.randn(size, 10, generator=gen)
        y = torch.randint(0, 10, (size,), generator=gen)
        ranks = (x > x.gather(1, y[:, None])).sum(1)  # classes scored above the label
        right1 += int((ranks < 1).sum())
        right5 += int((ranks < 5).sum())
        images += size
        batches.append((x, y))
    top1, top5 = _evaluate(torch.nn.Identity(), batches, nullcontext)
    assert (top1, top5) == (100.0 * right1 / images, 100.0 * right5 / images)
    assert 0 < right1 < images
