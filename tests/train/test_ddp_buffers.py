"""Under DDP every rank evaluates the model that rank 0 saves, BatchNorm statistics included.

Each rank updates its BatchNorm running statistics from its own batches; DDP copies rank 0's
only at the start of the next training forward. Three real gloo processes train a BatchNorm
ResNet; the test compares their buffers after training and evaluates rank 0's saved model
itself, in this process, on the whole validation split, each image counted once.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from an_search.search import BASELINES, SearchConfig, build_model
from an_search.train import TrainConfig, create_loaders, proxy_train, resolve_data

# 100 validation images on 3 ranks: shards of 34, 33 and 33 (timm's OrderedDistributedSampler
# padded them to 34 each with repeated images, counted twice: of 102).
TINY = TrainConfig(
    epochs=1, batches_per_epoch=3, batch_size=8, img_size=32, val_fraction=0.05, threads=1
)
RANKS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS
    )
    try:
        data = resolve_data(None)
        model = build_model(SearchConfig("resnet10t", train=TINY), data, BASELINES["bn"]).model
        result = proxy_train(model, data, TINY)
        torch.save(
            {"state": model.state_dict(), "top1": result.top1, "top5": result.top5},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ranks_evaluate_the_model_rank_0_saves(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=RANKS, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]
    for name, tensor in ranks[0]["state"].items():
        for other in ranks[1:]:
            assert torch.equal(tensor, other["state"][name]), name  # running stats included
    stats = [n for n in ranks[0]["state"] if n.endswith("running_mean")]
    assert stats  # a BatchNorm model: the statistics that drift apart are there

    data = resolve_data(None)
    model = build_model(SearchConfig("resnet10t", train=TINY), data, BASELINES["bn"]).model
    model.load_state_dict(ranks[0]["state"])
    model.eval()
    val = create_loaders(
        data, img_size=TINY.img_size, batch_size=TINY.batch_size, val_fraction=TINY.val_fraction
    ).val
    right1 = right5 = seen = 0
    with torch.no_grad():
        for x, y in val:
            top5 = model(x).topk(5, dim=1).indices
            right1 += int((top5[:, 0] == y).sum())
            right5 += int((top5 == y[:, None]).any(dim=1).sum())
            seen += len(y)
    assert seen == 100
    for r in ranks:
        assert r["top1"] == pytest.approx(100 * right1 / seen, abs=1e-9)
        assert r["top5"] == pytest.approx(100 * right5 / seen, abs=1e-9)
