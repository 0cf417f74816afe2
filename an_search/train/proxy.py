"""Proxy training: a few short epochs that rank candidate models, reporting top-1 every epoch.

The loop is deliberately flat (nanoGPT's train.py is the model): build loaders, optimizer and
schedule from timm's factories, then epochs of forward / backward / step with validation after
each. It serves the search (short runs, pruned through `on_epoch`) and longer retraining
(`checkpoint_dir` + `resume`, EMA weights). It never prints: progress goes to callbacks.

Reproducibility: every epoch re-seeds python, numpy and torch with (seed, epoch) and keys the
shuffle to it, so on CPU two runs with one seed agree exactly, and a run resumed from its
checkpoint after epoch e continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3, accuracy
from torch import nn

from an_search.errors import CheckpointError, NonFiniteLossError
from an_search.train.checkpoint import load_checkpoint, save_checkpoint
from an_search.train.config import MACHINE_SETTINGS, TrainConfig, TrainResult
from an_search.train.data import DataSpec
from an_search.train.loaders import create_loaders

__all__ = ["OnEpoch", "Progress", "check_resumable", "check_same_run", "proxy_train"]

OnEpoch = Callable[[int, float, float], bool]
Progress = Callable[[int, int], None]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _share_buffers(*models: nn.Module | None) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating.

    Each rank updates them from its own batches (DDP broadcasts rank 0's only at the start of
    the next training forward), so the ranks would evaluate models that differ from the one
    rank 0 saves, and the summed accuracy would be no model's.
    """
    if _dist_world() == 1:
        return
    for model in models:
        for buffer in model.buffers() if model is not None else ():
            dist.broadcast(buffer, src=0)


@torch.inference_mode()
def _evaluate(model: nn.Module, loader: Any, autocast: Any) -> tuple[float, float]:
    """Top-1 and top-5 (%) over the whole loader, summed over ranks under torch.distributed."""
    model.eval()
    hits1 = hits5 = count = 0
    for x, y in loader:
        with autocast():
            out = model(x)
        acc1, acc5 = accuracy(out.float(), y, topk=(1, 5))
        # timm's float32 percentages back to counts: sums of counts are exact, so two models
        # right on the same images score the same, to the last bit
        hits1 += round(acc1.item() * y.size(0) / 100)
        hits5 += round(acc5.item() * y.size(0) / 100)
        count += y.size(0)
    totals = torch.tensor([hits1, hits5, count], dtype=torch.float64)
    if _dist_world() > 1:  # hook for DDP: every rank saw a shard; add them up
        totals = totals.to(next(model.parameters()).device)
        dist.all_reduce(totals)
    hits1, hits5, count = (int(v) for v in totals.tolist())
    if not count:
        return math.nan, math.nan
    return 100.0 * hits1 / count, 100.0 * hits5 / count


def _mean_loss(meter: AverageMeter, device: torch.device) -> float:
    """An epoch's mean training loss, over every rank's images under torch.distributed."""
    if _dist_world() == 1:
        return meter.avg
    totals = torch.tensor([meter.sum, meter.count], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    total, count = totals.tolist()
    return total / count if count else math.nan


def proxy_train(
    model: nn.Module,
    data: DataSpec,
    cfg: TrainConfig | None = None,
    *,
    on_epoch: OnEpoch | None = None,
    progress: Progress | None = None,
    run: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train `model` in place on `data` for `cfg.epochs` short epochs; validate after each.

    Args:
        model: a classifier whose output width is `data.num_classes` (e.g. a timm model).
        data: the dataset (`resolve_data`).
        cfg: settings; None for the defaults.
        on_epoch: called as on_epoch(epoch, top1, top5) after each epoch (epoch 1-based);
            returning True stops training there (the search prunes the trial).
        progress: called as progress(done_updates, total_updates) after every update.
        run: what this run trains (JSON-able: its recipe, data, starting weights), stored with
            its checkpoints; a resume from a checkpoint stored for another run is refused.

    Returns:
        TrainResult with the last epoch's validation accuracy and the per-epoch history.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (training stops at once).
        TrainConfigError: a setting out of range.
        DataError: the data cannot be loaded.
        CheckpointError: `resume` found a checkpoint for another model or schedule.
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    on_cuda = device.type == "cuda"
    world = _dist_world()
    rank = dist.get_rank() if world > 1 else 0

    with _num_threads(cfg.threads):
        _seed_everything(cfg.seed)
        loaders = create_loaders(
            data,
            img_size=cfg.img_size,
            batch_size=cfg.batch_size,
            train_fraction=cfg.train_fraction,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            workers=cfg.workers,
            scale=cfg.scale,
            hflip=cfg.hflip,
            device=device,
        )
        steps = len(loaders.train)
        if cfg.batches_per_epoch is not None:
            steps = min(steps, cfg.batches_per_epoch)
        total_steps = cfg.epochs * steps

        # Model: NHWC and bf16 autocast pay off on tensor cores only; CPU stays fp32 NCHW.
        memory_format = torch.channels_last if on_cuda and cfg.channels_last else None
        model.to(device=device, memory_format=memory_format or torch.contiguous_format)
        autocast = nullcontext
        if on_cuda and cfg.amp:  # bf16 needs no GradScaler
            autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        train_model: nn.Module = model
        if world > 1:  # hook for DDP: gradients are averaged over ranks
            ids = [device.index] if on_cuda else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

        # timm factories: no weight decay on biases/norm params; the schedule ticks per update
        # so warmup and cosine work for 2-epoch proxies (warmup_epochs may be a fraction).
        lr = cfg.lr * cfg.batch_size * world / 256
        optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=False,
            updates_per_epoch=steps,
        )
        ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        # Resume: restore every state dict, then continue at the next epoch.
        history: list[dict[str, float]] = []
        num_updates, start_epoch, restored_s = 0, 1, 0.0
        state = load_checkpoint(cfg.checkpoint_dir) if cfg.resume else None
        if state is not None:
            check_resumable(cfg, state, run, world)
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                saved_ema = state.get("model_ema") or state.get("ema")  # (before: "ema")
                if ema is not None and saved_ema:
                    ema.module.load_state_dict(saved_ema)
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(
                    f"checkpoint in {cfg.checkpoint_dir} does not match this model or optimizer "
                    f"({str(e).splitlines()[0][:80]}); delete it to start over"
                ) from e
            if scheduler is not None and state.get("scheduler"):
                scheduler.load_state_dict(state["scheduler"])
            num_updates, history = int(state["num_updates"]), list(state["history"])
            restored_s = sum(float(r.get("wall_s", 0.0)) for r in history)
            start_epoch = int(state["epoch"]) + 1
            if scheduler is not None:
                scheduler.step_update(num_updates)  # put the lr where training left it

        stopped_early = None
        for epoch in range(start_epoch, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            # Randomness depends only on (seed, epoch): resuming reproduces the same batches.
            _seed_everything(cfg.seed * 100_003 + epoch)
            loaders.set_epoch(epoch)
            train_model.train()
            loss_meter = AverageMeter()
            for step, (x, y) in enumerate(islice(loaders.train, steps), start=1):
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                with autocast():
                    loss = loss_fn(train_model(x), y)
                loss_value = loss.item()  # one sync per step: a NaN must stop training at once
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"training loss became {loss_value} at epoch {epoch}, update {step}; "
                        f"lower the learning rate (lr={cfg.lr}) or check the model",
                        epoch=epoch,
                        step=step,
                        history=history,
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                num_updates += 1
                if scheduler is not None:
                    scheduler.step_update(num_updates)
                if ema is not None:
                    ema.update(model, step=num_updates)
                loss_meter.update(loss_value, y.size(0))
                if progress is not None:
                    progress(num_updates, total_steps)

            _share_buffers(model, ema.module if ema is not None else None)
            top1, top5 = _evaluate(model, loaders.val, autocast)
            record = {
                "epoch": epoch,
                "top1": top1,
                "top5": top5,
                "train_loss": _mean_loss(loss_meter, next(model.parameters()).device),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if ema is not None:
                record["ema_top1"] = _evaluate(ema.module, loaders.val, autocast)[0]
            record["wall_s"] = time.perf_counter() - t_epoch
            history.append(record)

            if cfg.checkpoint_dir is not None and rank == 0:
                saved = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "epoch": epoch,
                    "num_updates": num_updates,
                    "history": history,
                    "config": asdict(cfg),
                    "processes": world,
                    "run": None if run is None else json.dumps(run, sort_keys=True),
                }
                if ema is not None:  # (timm's key: its loaders, an-convert's too, take the EMA)
                    saved["model_ema"] = ema.module.state_dict()
                save_checkpoint(cfg.checkpoint_dir, saved)
            if on_epoch is not None and on_epoch(epoch, top1, top5):
                if epoch < cfg.epochs:
                    stopped_early = f"on_epoch asked to stop after epoch {epoch}"
                break

    last = history[-1] if history else {"top1": float("nan"), "top5": float("nan")}
    return TrainResult(
        top1=last["top1"],
        top5=last["top5"],
        history=history,
        steps=num_updates,
        wall_s=time.perf_counter() - t_start + restored_s,
        stopped_early=stopped_early,
    )


def check_resumable(
    cfg: TrainConfig, state: Mapping[str, Any], run: Mapping[str, Any] | None, processes: int
) -> None:
    """Refuse to resume ``state``, the checkpoint in ``cfg.checkpoint_dir``, unless it was saved
    with these training settings, for this run (``proxy_train``'s ``run``) and by as many
    processes.

    Raises:
        CheckpointError: naming what differs.
    """
    check_same_settings(cfg, state.get("config", {}))
    check_same_run(cfg.checkpoint_dir, state.get("run"), run)
    check_same_processes(cfg.checkpoint_dir, state.get("processes"), processes)


def check_same_settings(cfg: TrainConfig, saved: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint saved with other training settings (``saved``: its
    ``config``); where it runs (device, threads, loader workers) may differ.

    Raises:
        CheckpointError: a setting differs (the message names it).
    """
    for key in (f.name for f in fields(cfg) if f.name not in MACHINE_SETTINGS):
        if key in saved and saved[key] != getattr(cfg, key):
            raise CheckpointError(
                f"checkpoint in {cfg.checkpoint_dir} has {key}={saved[key]!r}, "
                f"not {getattr(cfg, key)!r}; use the same setting or delete it"
            )


def check_same_processes(
    directory: str | os.PathLike[str] | None, saved: Any, processes: int
) -> None:
    """Refuse to resume a checkpoint saved by a run of another process count (``saved``; None:
    from before this was stored, not compared): the global batch, the learning rate (scaled
    with it) and each process's share of the data follow it, so the resumed epochs would
    train neither run's schedule.

    Raises:
        CheckpointError: the counts differ.
    """
    if saved is None or int(saved) == processes:
        return
    raise CheckpointError(
        f"checkpoint in {directory} was saved by a run of {saved} processes, this one has "
        f"{processes} (the global batch and the learning rate scale with them): resume with "
        f"nproc={saved}, or delete it to start over"
    )


def check_same_run(
    directory: str | os.PathLike[str] | None, stored: str | None, run: Mapping[str, Any] | None
) -> None:
    """Refuse to resume a checkpoint stored for another run (``stored``: its ``run`` entry; one
    stored without is not compared: from before this was stored, or by a caller without one).

    Raises:
        CheckpointError: the runs differ (the message names what differs).
    """
    if stored is None or run is None:
        return
    theirs, ours = json.loads(stored), json.loads(json.dumps(run, sort_keys=True))
    differ = [k for k in sorted({*theirs, *ours}) if theirs.get(k) != ours.get(k)]
    if differ:
        raise CheckpointError(
            f"checkpoint in {directory} was saved by a run with another {', '.join(differ)}: "
            f"delete {directory} to start over, or use another output directory"
        )
