"""One torchrun rank of :func:`an_search.train.distributed.train_distributed`.

``python -m an_search.train._ddp_rank SPEC.json``: load the saved model, optionally convert it to
SyncBatchNorm (keeping AN), run :func:`proxy_train` (its DDP hooks do the rest), and talk to the
driver through its ``TCPStore``: rank 0 sends each epoch's result and waits for the verdict,
which ``dist.broadcast`` hands to every rank; results go back the same way, and each failed rank
leaves its error under ``error/<rank>`` for the driver to choose the cause from.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from an_search.errors import NonFiniteLossError
from an_search.train.config import TrainConfig
from an_search.train.data import DataSpec
from an_search.train.distributed import DRIVER_STORE_ENV
from an_search.train.proxy import proxy_train

_STORE_TIMEOUT = timedelta(minutes=30)  # rank 0 waits this long for the driver's decision
# What gloo and NCCL put in the errors a rank gets when a peer died or left a collective
# (torch raises a plain RuntimeError for some of them, e.g. from DDP's backward all-reduce).
_COMM_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "gloo",
    "NCCL",
    "ProcessGroup",
)


def _rank_main(spec_path: str) -> None:
    """One torchrun rank: load the model, train it, talk to the driver through the store."""
    from an_search.layers import convert_sync_batchnorm
    from an_search.rewrite import load

    spec = json.loads(Path(spec_path).read_text())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    host, port = os.environ[DRIVER_STORE_ENV].rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=_STORE_TIMEOUT)
    train = TrainConfig(**{**spec["train"], "scale": tuple(spec["train"]["scale"])})
    if spec["backend"] == "nccl":
        torch.cuda.set_device(local_rank)
        train = replace(train, device=f"cuda:{local_rank}")
    data = DataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["data"].items()})
    dist.init_process_group(backend=spec["backend"])
    try:
        model, _ = load(spec["model_dir"])
        if spec["sync_bn"]:
            model = convert_sync_batchnorm(model)
        on_epoch = _RankOnEpoch(store, rank, train.device)
        result = proxy_train(model, data, train, on_epoch=on_epoch, run=spec.get("run"))
    except Exception as exc:
        _report_error(store, exc, rank)
        raise
    world = dist.get_world_size()
    summary = {"rank": rank, "world_size": world, "epochs": len(result.history)}
    store.set(f"rank/{rank}", json.dumps(summary | {"steps": result.steps, "device": train.device}))
    if rank == 0:
        store.set("result", json.dumps(asdict(result)))
    dist.destroy_process_group()


class _RankOnEpoch:
    """``on_epoch`` of every rank: rank 0 asks the driver, then all ranks get its answer."""

    def __init__(self, store: dist.TCPStore, rank: int, device: str) -> None:
        self.store, self.rank, self.device, self.n = store, rank, torch.device(device), 0

    def __call__(self, epoch: int, top1: float, top5: float) -> bool:
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        if self.rank == 0:
            self.store.set(
                f"report/{self.n}", json.dumps({"epoch": epoch, "top1": top1, "top5": top5})
            )
            flag[0] = int(self.store.get(f"decision/{self.n}") == b"1")
        dist.broadcast(flag, src=0)  # the same verdict on every rank: they stop together
        self.n += 1
        return bool(flag.item())


def _report_error(store: dist.TCPStore, exc: BaseException, rank: int) -> None:
    """Leave this rank's error under its own key, ``error/<rank>``, numbered in failing order.

    One shared key would keep the last writer: when one rank fails, its peers fail next in a
    collective ("Connection closed by peer") and would hide the cause. The driver sees every
    rank's error, with ``seq`` (1 for the first to fail) and ``comm``, and picks the cause.
    """
    record = _error(exc, rank) | {"seq": store.add("error_seq", 1), "comm": _is_comm_error(exc)}
    if isinstance(exc, NonFiniteLossError):
        record |= {"epoch": exc.epoch, "step": exc.step, "history": exc.history}
    store.set(f"error/{rank}", json.dumps(record))


def _is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective or connection, the usual echo of a dead peer."""
    if isinstance(exc, dist.DistError):
        return True
    message = str(exc)
    return any(marker in message for marker in _COMM_MARKERS)


def _error(exc: BaseException, rank: int) -> dict[str, Any]:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return {"type": type(exc).__name__, "message": first, "rank": rank}


if __name__ == "__main__":
    _rank_main(sys.argv[1])
