"""Settings and results of a training run: `TrainConfig` and `TrainResult`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from an_search._values import SEED_MAX, first_line, is_integer, is_number
from an_search.errors import TrainConfigError

__all__ = ["MACHINE_SETTINGS", "TrainConfig", "TrainResult"]

#: TrainConfig fields that may differ between the runs of one training (a resume, another
#: machine, a study's workers): where and how fast it runs, not what it computes.
MACHINE_SETTINGS = (
    "device", "amp", "channels_last", "workers", "threads", "checkpoint_dir", "resume",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Proxy-training settings; the defaults suit a ResNet-18 on the embedded Animal-MNIST.

    Attributes:
        epochs: passes over the (possibly truncated) training set.
        batches_per_epoch: cap on updates per epoch (None = the whole training set).
        img_size: square input side in pixels.
        batch_size: images per update and process.
        lr: peak learning rate for a global batch of 256; the rate used is
            lr * batch_size * world_size / 256 (linear scaling rule), 0.1 at the defaults.
        opt: timm optimizer name (`timm.optim.list_optimizers()`).
        momentum: SGD momentum (ignored by optimizers without one).
        weight_decay: L2 decay; timm's optimizer factory exempts biases and norm parameters.
        sched: timm scheduler name; stepped every update, cosine to `min_lr`.
        warmup_epochs: linear warmup length in epochs, fractions allowed.
        warmup_lr: learning rate at the first update.
        min_lr: learning rate at the end of the schedule.
        label_smoothing: cross-entropy label smoothing.
        scale: area range of the random-resized crop (light: the images are tiny).
        hflip: horizontal flip probability.
        train_fraction: stratified, seeded share of the training split, in (0, 1].
        val_fraction: stratified, seeded share of the validation split, in (0, 1].
        seed: seeds the subset, the shuffles, augmentation and dropout.
        device: "cpu", "cuda" or "cuda:N".
        amp: bfloat16 autocast, on CUDA only.
        channels_last: NHWC memory format, on CUDA only.
        workers: DataLoader worker processes (0 = load in this process; enough for tiny images).
        threads: torch intra-op threads while training (None = leave as is); restored after.
        ema_decay: keep a ModelEmaV3 of the weights with this decay and validate it too
            (history gets "ema_top1"); None = off.
        checkpoint_dir: write last.pth there after every epoch (None = no checkpoints).
        resume: continue from checkpoint_dir/last.pth when it exists.
    """

    epochs: int = 2
    batches_per_epoch: int | None = None
    img_size: int = 32
    batch_size: int = 64
    lr: float = 0.4
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-5
    sched: str = "cosine"
    warmup_epochs: float = 0.2
    warmup_lr: float = 1e-4
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    scale: tuple[float, float] = (0.7, 1.0)
    hflip: float = 0.5
    train_fraction: float = 1.0
    val_fraction: float = 1.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    channels_last: bool = True
    workers: int = 0
    threads: int | None = None
    ema_decay: float | None = None
    checkpoint_dir: str | None = None
    resume: bool = False

    def validate(self) -> None:
        """Raise TrainConfigError naming the first setting of a wrong type or out of range, or
        an optimizer or scheduler (with its settings) that timm's factories refuse."""
        _check_types(self)
        checks = [
            (self.epochs >= 1, "epochs", "at least 1"),
            (
                self.batches_per_epoch is None or self.batches_per_epoch >= 1,
                "batches_per_epoch",
                "None or at least 1",
            ),
            (self.img_size >= 8, "img_size", "at least 8"),
            (self.batch_size >= 2, "batch_size", "at least 2 (BatchNorm needs 2 images)"),
            (self.lr > 0, "lr", "positive"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)"),
            (0.0 < self.train_fraction <= 1.0, "train_fraction", "in (0, 1]"),
            (0.0 < self.val_fraction <= 1.0, "val_fraction", "in (0, 1]"),
            (self.warmup_epochs >= 0, "warmup_epochs", "0 or more"),
            (self.workers >= 0, "workers", "0 or more"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "None or in (0, 1)"),
            (self.seed >= 0, "seed", "0 or more"),
            (self.seed <= SEED_MAX, "seed", f"at most {SEED_MAX} (2**32 - 1)"),
            (self.threads is None or self.threads >= 1, "threads", "None or at least 1"),
            (self.momentum >= 0, "momentum", "0 or more"),
            (self.weight_decay >= 0, "weight_decay", "0 or more"),
            (self.warmup_lr >= 0, "warmup_lr", "0 or more"),
            (self.min_lr >= 0, "min_lr", "0 or more"),
            (0.0 <= self.hflip <= 1.0, "hflip", "in [0, 1]"),
            (0 < self.scale[0] <= self.scale[1], "scale", "(low, high) with 0 < low <= high"),
            (not self.resume or self.checkpoint_dir, "resume", "used with a checkpoint_dir"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise TrainConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        for name in _FLOATS:  # (inf passed "positive": lr inf trained a model of NaN)
            if not math.isfinite(getattr(self, name)):
                raise TrainConfigError(f"{name} must be finite, got {getattr(self, name)!r}")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise TrainConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise TrainConfigError(f"device {self.device!r} but CUDA is not available; use 'cpu'")
        _check_factories(self)


_INTS = ("epochs", "img_size", "batch_size", "seed", "workers")
_OPTIONAL_INTS = ("batches_per_epoch", "threads")
_FLOATS = (
    "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "label_smoothing",
    "hflip", "train_fraction", "val_fraction",
)  # fmt: skip
_BOOLS = ("amp", "channels_last", "resume")


def _check_types(cfg: TrainConfig) -> None:
    """Each setting of the type it is compared as (a string or float where an int goes would
    fail deep inside training, or be silently rounded)."""

    wrong = [(n, "an integer") for n in _INTS if not is_integer(getattr(cfg, n))]
    wrong += [
        (n, "None or an integer")
        for n in _OPTIONAL_INTS
        if getattr(cfg, n) is not None and not is_integer(getattr(cfg, n))
    ]
    wrong += [(n, "a number") for n in _FLOATS if not is_number(getattr(cfg, n))]
    wrong += [(n, "True or False") for n in _BOOLS if not isinstance(getattr(cfg, n), bool)]
    wrong += [
        (n, "a name") for n in ("opt", "sched", "device") if not isinstance(getattr(cfg, n), str)
    ]
    if cfg.ema_decay is not None and not is_number(cfg.ema_decay):
        wrong.append(("ema_decay", "None or a number"))
    scale = cfg.scale
    if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and all(map(is_number, scale))):
        wrong.append(("scale", "a pair of numbers (low, high)"))
    if wrong:
        name, kind = wrong[0]
        raise TrainConfigError(f"{name} must be {kind}, got {getattr(cfg, name)!r}")


def _check_factories(cfg: TrainConfig) -> None:
    """Build the optimizer and scheduler on one parameter, as training will, so that a name or
    setting timm refuses is found before anything runs."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    param = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = create_optimizer_v2(
            [param], opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
    except Exception as exc:  # noqa: BLE001 - timm raises ValueError, TypeError, ...
        raise TrainConfigError(
            f"opt {cfg.opt!r} cannot be built by timm ({first_line(exc)}): use a name of "
            "timm.optim.list_optimizers()"
        ) from None
    try:
        create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=1,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - ValueError, AssertionError ("plateau"), ...
        raise TrainConfigError(
            f"sched {cfg.sched!r} cannot be built by timm ({first_line(exc)}): use one that "
            "steps every update (cosine, tanh, step, multistep, poly)"
        ) from None


@dataclass
class TrainResult:
    """What a proxy run measured.

    Attributes:
        top1: validation top-1 accuracy (%) after the last epoch run.
        top5: validation top-5 accuracy (%) after it.
        history: one dict per finished epoch: epoch (1-based), top1, top5, train_loss, lr,
            wall_s (that epoch's seconds, validation included), and ema_top1 with EMA on.
        steps: optimizer updates done in total (resumed ones included).
        wall_s: seconds of training: this call's, plus the epochs a resumed run restored
            (their ``wall_s``).
        stopped_early: why training ended before `epochs`, or None.
    """

    top1: float
    top5: float
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0
    stopped_early: str | None = None
