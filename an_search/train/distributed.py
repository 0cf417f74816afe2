"""Train one model under ``torchrun``: G processes, DDP, a driver that decides after each epoch.

The driver (the process that holds the Optuna trial, DESIGN point 10) calls
:func:`train_distributed`: it saves the model (``save``: safetensors + recipe, so every rank
starts from the very same weights), hosts a ``torch.distributed.TCPStore`` on loopback, and runs
``python -m torch.distributed.run --standalone --nproc-per-node G -m an_search.train._ddp_rank
SPEC``. Each rank loads the model, optionally converts it with :func:`convert_sync_batchnorm`
(which keeps AN's mixture parameters), and runs :func:`proxy_train`, whose hooks shard the data
with ``DistributedSampler``, wrap the model in DDP and all-reduce the validation counts.

After every epoch rank 0 writes ``report/<n>`` (epoch, top-1, top-5) to the driver's store and
blocks on ``decision/<n>``; the driver answers with ``on_epoch``'s verdict (e.g. Optuna's pruning
decision) and rank 0 broadcasts it with ``dist.broadcast``, so every rank stops after the same
epoch. Rank 0 leaves ``result`` (the ``TrainResult``) and every rank ``rank/<r>`` in the store.
A rank that fails leaves ``error/<r>``; when one rank fails its peers fail next in a collective
("Connection closed by peer"), so the driver raises the cause, not those echoes: a non-finite
loss first (it prunes the trial, as in one process), else the first rank to fail.

Batch and learning rate: ``train.batch_size`` is per process, so the global batch is
``batch_size * G`` and :func:`proxy_train` uses ``lr * batch_size * G / 256`` (linear scaling).
Backends: NCCL on CUDA (one GPU per rank: ``cuda:LOCAL_RANK``), gloo on CPU. SyncBN needs CUDA
(torch's ``SyncBatchNorm`` rejects CPU tensors); without it each rank normalises with the
statistics of its own ``batch_size`` images, as plain DDP does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from an_search.errors import NonFiniteLossError, TrainConfigError, WorkerError
from an_search.train.config import TrainConfig, TrainResult
from an_search.train.data import DataSpec
from an_search.train.proxy import OnEpoch

__all__ = ["DRIVER_STORE_ENV", "DistributedResult", "die_with_parent", "train_distributed"]

DRIVER_STORE_ENV = "AN_SEARCH_DDP_STORE"  # host:port of the driver's TCPStore, for the ranks
_POLL_S = 0.05
_STOP_GRACE_S = 15.0


@dataclass
class DistributedResult:
    """What a torchrun training measured.

    Attributes:
        result: rank 0's ``TrainResult`` (metrics are all-reduced, so every rank agrees).
        ranks: one dict per rank: rank, world_size, epochs (trained), steps, device.
        log: torchrun's output (its last 4,000 characters).
    """

    result: TrainResult
    ranks: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""


def train_distributed(
    model: nn.Module,
    recipe: Any,
    data: DataSpec,
    train: TrainConfig,
    *,
    nproc: int,
    on_epoch: OnEpoch | None = None,
    sync_bn: bool = False,
    threads: int | None = None,
    run: Mapping[str, Any] | None = None,
) -> DistributedResult:
    """Proxy-train ``model`` in ``nproc`` torchrun processes; this process decides each epoch.

    Args:
        model: the model to train (not modified: ranks train copies loaded from disk).
        recipe: its ``Recipe`` (``an_search.rewrite``), saved with the weights.
        data: the dataset; every rank reads its own shard.
        train: settings; ``batch_size`` is per process (global batch = batch_size * nproc).
        nproc: processes (GPUs on CUDA) in the trial, at least 1.
        on_epoch: ``on_epoch(epoch, top1, top5) -> stop``, called here after each epoch; its
            answer reaches every rank before the next epoch.
        sync_bn: convert BatchNorms (AN's inner ones included) to ``SyncBatchNorm`` (CUDA only).
        threads: torch threads per rank on CPU (None: ``train.threads``).
        run: what the run trains, stored with its checkpoints (as for ``proxy_train``).

    Raises:
        NonFiniteLossError: a rank's loss became NaN or infinite.
        WorkerError: torchrun or a rank failed (the rank's first error line in the message).
        TrainConfigError: ``nproc`` < 1, or SyncBN asked for on CPU.
    """
    cuda = torch.device(train.device).type == "cuda"
    if nproc < 1:
        raise TrainConfigError(f"processes per trial must be at least 1, got {nproc}")
    if sync_bn and not cuda:
        raise TrainConfigError(
            "SyncBatchNorm needs CUDA (torch rejects CPU tensors); drop sync_bn on CPU"
        )
    from an_search.rewrite import save

    spec_train = replace(train, threads=threads if threads is not None else train.threads)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="an-search-ddp-") as tmp:
        work = Path(tmp)
        save(model, recipe, work / "model")
        spec = {
            "model_dir": str(work / "model"),
            "train": asdict(spec_train),
            "data": asdict(data),
            "sync_bn": sync_bn,
            "run": None if run is None else dict(run),
            "backend": "nccl" if cuda else "gloo",
        }
        (work / "spec.json").write_text(json.dumps(spec))
        log_path = work / "torchrun.log"
        rc = _run_torchrun(work / "spec.json", log_path, nproc, store, on_epoch, spec_train)
        log = log_path.read_text(errors="replace")[-4000:]
    if rc != 0:
        _raise_rank_error(store, rc, log, nproc)
    try:
        result = TrainResult(**json.loads(store.get("result")))
        ranks = [json.loads(store.get(f"rank/{r}")) for r in range(nproc)]
    except Exception as exc:  # noqa: BLE001 - a missing key means a rank ended early
        raise WorkerError(
            f"torchrun ended without the ranks' results ({exc}); see its log"
        ) from None
    return DistributedResult(result, ranks, log)


def _run_torchrun(
    spec: Path,
    log_path: Path,
    nproc: int,
    store: dist.TCPStore,
    on_epoch: OnEpoch | None,
    train: TrainConfig,
) -> int:
    """Start torchrun, answer rank 0's per-epoch reports until it exits; return its exit code."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"),
        *(f"--nproc-per-node={nproc}", "--max-restarts=0"),
        *("-m", "an_search.train._ddp_rank", str(spec)),
    ]
    env = {**os.environ, DRIVER_STORE_ENV: f"127.0.0.1:{store.port}"}
    if train.threads is not None:  # else torchrun sets OMP_NUM_THREADS=1 and warns
        env["OMP_NUM_THREADS"] = str(train.threads)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with open(log_path, "wb") as log:
        # Own session: a Ctrl-C on the terminal reaches the driver only, which stops torchrun.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        try:
            n = 0
            while proc.poll() is None:
                if not store.check([f"report/{n}"]):
                    time.sleep(_POLL_S)
                    continue
                rec = json.loads(store.get(f"report/{n}"))
                stop = bool(on_epoch(rec["epoch"], rec["top1"], rec["top5"])) if on_epoch else False
                store.set(f"decision/{n}", "1" if stop else "0")
                n += 1
        finally:
            if proc.poll() is None:  # interrupted or failed here: stop every rank
                _stop(proc)
    return proc.returncode


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies (Linux).

    So a driver or a search killed with SIGKILL leaves no torchrun ranks or workers behind.
    None where ``prctl(PR_SET_PDEATHSIG)`` does not exist.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def preexec() -> None:
        libc.prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG

    return preexec


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun's process group (torchrun stops its ranks), SIGKILL after a grace."""
    for sig, wait_s in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _raise_rank_error(store: dist.TCPStore, rc: int, log: str, nproc: int) -> None:
    """Raise the cause of a failed torchrun: the ranks' root error; a rank killed by a signal
    (which records none); else torchrun's last error line."""
    errors = [
        json.loads(store.get(f"error/{r}")) for r in range(nproc) if store.check([f"error/{r}"])
    ]
    root = _root_cause(log)  # (its rank, what happened), used when that rank recorded nothing
    died = root[1] if root is not None and root[0] not in {e["rank"] for e in errors} else None
    if errors and not (died is not None and all(e.get("comm") for e in errors)):
        err = min(errors, key=_cause_first)
        if err["type"] == "NonFiniteLossError":
            raise NonFiniteLossError(
                err["message"], epoch=err["epoch"], step=err["step"], history=err["history"]
            )
        raise WorkerError(
            f"rank {err['rank']} of the torchrun trial failed: {err['type']}: {err['message']}"
        )
    if died is not None:  # only its peers' echoes of it, if any, were recorded
        raise WorkerError(f"{died} (torchrun exited with code {rc} before training finished)")
    lines = [ln for ln in log.splitlines() if "Error" in ln or "error" in ln]
    last = lines[-1].strip()[:200] if lines else "no error line in its output"
    raise WorkerError(f"torchrun exited with code {rc} before training finished: {last}")


def _root_cause(log: str) -> tuple[int, str] | None:
    """The rank that torchrun's failure summary names as its root cause, and how it ended;
    the caller uses it when that rank recorded no error of its own (killed by a signal, e.g.
    SIGKILL by hand or by the OOM killer)."""
    _, found, cause = log.partition("Root Cause (first observed failure):")
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", cause, re.M)
    code = re.search(r"^\s*exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG[A-Z]+)\))?\s*$", cause, re.M)
    if not found or rank is None or code is None:
        return None
    name = code[2] or _signal_name(int(code[1]))  # (torch before 2.14 prints no name)
    how = f"was killed by {name}" if name else f"exited with code {code[1]}"
    return int(rank[1]), f"rank {rank[1]} of the torchrun trial {how} before it reported an error"


def _signal_name(exitcode: int) -> str | None:
    """The signal a negative exit code names (-9: SIGKILL), as torchrun's summary gives it."""
    try:
        return signal.Signals(-exitcode).name if exitcode < 0 else None
    except ValueError:
        return None


def _cause_first(err: dict[str, Any]) -> tuple[bool, bool, int]:
    """Sort key of the ranks' errors, the likeliest cause first.

    When one rank fails, its peers fail next in a collective ("Connection closed by peer"): those
    echoes come last. A non-finite loss comes first, since it prunes the trial as in one process;
    among the rest, the rank that failed first (``seq``) names the cause.
    """
    return err["type"] != "NonFiniteLossError", bool(err.get("comm")), int(err.get("seq", 0))
