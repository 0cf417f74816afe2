"""A trial trained by 2 torchrun processes (gloo on CPU) agrees with 1 process; pruning stops both.

Why the two runs must agree (the tolerance below is one validation image): with the global batch
fixed at 16 (2 ranks x 8 against 1 x 16), ``DistributedSampler`` gives the union of the two
ranks' batches = the single process's batch at every step (the same seeded permutation, ranks
interleaved); DDP averages the two per-rank mean gradients = the mean gradient over the 16; the
linear rule gives the same learning rate (lr * 8 * 2 / 256 = lr * 16 / 256); augmentation is off
(full-image crop, no flip) because each rank would draw crops from its own random stream. What
remains is the normalisation: BatchNorm would normalise each rank's 8 images with their own
statistics, and SyncBatchNorm (the fix, through ``convert_sync_batchnorm`` which keeps AN) needs
CUDA in torch. So the CPU test uses ConvNeXt-atto, whose LayerNorms see one image at a time:
the runs then differ only by floating-point summation order, which can flip at most an argmax
near a tie; hence "within one image of 100". The GPU test checks SyncBN on a BatchNorm ResNet.
"""

from __future__ import annotations

import copy
import socket
from functools import partial
from pathlib import Path

import optuna
import pytest
import torch
import torch.distributed as dist
import yaml
from optuna.trial import TrialState

from an_search.search import BASELINES, DDPObjective, SearchConfig, build_model, prepare_search
from an_search.train import proxy_train, resolve_data
from an_search.train.distributed import train_distributed

ONE_IMAGE = 1.0  # percentage points on the 100 validation images
DETERMINISTIC = {"scale": (1.0, 1.0), "hflip": 0.0, "epochs": 2, "batches_per_epoch": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_reference(
    model: torch.nn.Module, data, train, backend: str = "gloo"
) -> list[dict]:
    """The same training as one torch.distributed process (world size 1, same sampler; on a GPU
    with NCCL, where SyncBN falls back to plain BN)."""
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        return proxy_train(model, data, train).history
    finally:
        dist.destroy_process_group()


def _agree(two: list[dict], one: list[dict]) -> None:
    assert [h["epoch"] for h in two] == [h["epoch"] for h in one] == [1, 2]
    for a, b in zip(two, one, strict=True):
        assert abs(a["top1"] - b["top1"]) <= ONE_IMAGE, (two, one)
        assert abs(a["top5"] - b["top5"]) <= ONE_IMAGE, (two, one)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)  # linear rule: same global batch


def test_two_gloo_ranks_match_one_process(tiny_train) -> None:
    data = resolve_data(None)
    train2 = tiny_train(**DETERMINISTIC, batch_size=8)
    cfg = SearchConfig("convnext_atto", train=train2)
    built = build_model(cfg, data, BASELINES["bn"])
    reference = copy.deepcopy(built.model)

    run = train_distributed(built.model, built.recipe, data, train2, nproc=2, threads=1)
    assert [(r["rank"], r["world_size"], r["epochs"]) for r in run.ranks] == [(0, 2, 2), (1, 2, 2)]
    assert run.result.steps == 6

    one = _one_process_reference(reference, data, tiny_train(**DETERMINISTIC, batch_size=16))
    _agree(run.result.history, one)
    assert run.result.history[-1]["top1"] > 10.0  # it learnt something: not a vacuous match
    # the training loss is the mean over both ranks' images, as one process's over the same
    # images (LayerNorm: no per-rank batch statistics); before: rank 0's half
    losses = [h["train_loss"] for h in run.result.history]
    assert losses == pytest.approx([h["train_loss"] for h in one], rel=1e-4)


def test_pruning_on_rank_0_stops_both_ranks(tmp_path: Path, tiny_train) -> None:
    """The driver's pruner decides after epoch 1 of 3; rank 0 broadcasts it; both ranks stop."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"placement": "paper", "k": 4}))
    cfg = SearchConfig(
        "resnet10t",
        space=space,
        storage=tmp_path / "j.log",
        output_dir=tmp_path,
        train=tiny_train(epochs=3, batches_per_epoch=3, batch_size=8),
    )
    objective, _ = prepare_search(cfg, make_objective=partial(DDPObjective, nproc=2))
    # A pruner that prunes every value (top-1 < 101): the verdict comes from Optuna, here.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(101))
    study.optimize(objective, n_trials=1)

    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert "epoch 1/3" in trial.user_attrs["prune_reason"]
    assert trial.user_attrs["ddp"] == {
        "nproc": 2,
        "sync_bn": False,
        "global_batch": 16,
        "rank_epochs": [1, 1],  # rank 1 stopped after epoch 1 too
    }
    assert len(trial.user_attrs["history"]) == 1 and trial.user_attrs["steps"] == 3
    assert list(trial.intermediate_values) == [1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL, one a rank)")
def test_two_nccl_ranks_with_sync_bn_match_one_gpu(tiny_train) -> None:
    data = resolve_data(None)
    train2 = tiny_train(**DETERMINISTIC, batch_size=8, device="cuda", amp=False, threads=None)
    cfg = SearchConfig("resnet10t", train=train2)
    built = build_model(cfg, data, BASELINES["paper"])  # AN sites: SyncBN must keep them
    reference = copy.deepcopy(built.model)
    run = train_distributed(built.model, built.recipe, data, train2, nproc=2, sync_bn=True)
    train1 = tiny_train(**DETERMINISTIC, batch_size=16, device="cuda", amp=False, threads=None)
    _agree(run.result.history, _one_process_reference(reference, data, train1, "nccl"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_one_nccl_rank_under_torchrun_matches_one_gpu(tiny_train) -> None:
    """The torchrun path on one GPU (NCCL, SyncBN with AN kept) against plain proxy training."""
    data = resolve_data(None)
    train = tiny_train(**DETERMINISTIC, batch_size=16, device="cuda", amp=False, threads=None)
    built = build_model(SearchConfig("resnet10t", train=train), data, BASELINES["paper"])
    reference = copy.deepcopy(built.model)
    run = train_distributed(built.model, built.recipe, data, train, nproc=1, sync_bn=True)
    assert [r["device"] for r in run.ranks] == ["cuda:0"]
    _agree(run.result.history, _one_process_reference(reference, data, train, "nccl"))
