"""A torchrun trial whose rank 1 fails reports rank 1's error, not rank 0's echo of it.

When rank 1 dies, rank 0 fails next in DDP's all-reduce with gloo's "Connection closed by peer".
Both are real torchrun ranks (gloo on CPU); the failure is injected into rank 1 only, by a
``sitecustomize`` on the ``PYTHONPATH`` that ``train_distributed`` passes on to the ranks: it
patches torch in the rank whose ``RANK`` is 1, from its second training update on.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from an_search.errors import WorkerError
from an_search.search import BASELINES, DDPObjective, SearchConfig, build_model, prepare_search
from an_search.train import TrainConfig, resolve_data
from an_search.train.distributed import train_distributed

FAIL_ENV = "AN_SEARCH_TEST_RANK1_FAILS"  # "raise", "nan" or "kill"
INJECTED = "injected failure in rank 1"
# Rank 1 fails at update 2 of 3: rank 0 is then in the all-reduce of its own backward.
TINY = TrainConfig(
    epochs=1, batches_per_epoch=3, batch_size=8, img_size=32, val_fraction=0.05, threads=1
)

SITECUSTOMIZE = f'''
import os

if os.environ.get("RANK") == "1" and os.environ.get("{FAIL_ENV}"):
    import torch
    import torch.nn.functional as F

    _calls = [0]
    _mode = os.environ["{FAIL_ENV}"]
    _cross_entropy = F.cross_entropy

    def _failing(*args, **kwargs):
        _calls[0] += 1
        loss = _cross_entropy(*args, **kwargs)
        if _calls[0] < 2:
            return loss
        if _mode == "raise":
            raise RuntimeError("{INJECTED}")
        if _mode == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return loss * float("nan")

    F.cross_entropy = _failing
'''


@pytest.fixture
def rank1_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``rank1_fails(mode)``: make rank 1 of the next torchrun fail ("raise", "nan", "kill")."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(inject), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    return lambda mode: monkeypatch.setenv(FAIL_ENV, mode)


@pytest.mark.parametrize(
    ("mode", "cause"),
    [
        ("raise", f"rank 1 of the torchrun trial failed: RuntimeError: {INJECTED}"),
        # a SIGKILLed rank records no error: torchrun's root cause names it (not the last log
        # line with "error" in it, such as "error_file: <N/A>")
        ("kill", "rank 1 of the torchrun trial was killed by SIGKILL before it reported"),
    ],
)
def test_rank_1_failure_is_reported_not_rank_0_connection_error(
    mode: str, cause: str, rank1_fails
) -> None:
    rank1_fails(mode)
    data = resolve_data(None)
    built = build_model(SearchConfig("resnet10t", train=TINY), data, BASELINES["bn"])
    with pytest.raises(WorkerError) as info:
        train_distributed(built.model, built.recipe, data, TINY, nproc=2, threads=1)
    message = str(info.value)
    assert message.startswith(cause), message
    assert "Connection closed" not in message and "error_file" not in message


def _torchrun_summary(rank: int, exitcode: str) -> str:
    """torchrun's failure summary, as it prints it (torch 2.x elastic)."""
    return (
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-11-28_04:01:55\n"
        f"  host      : localhost\n  rank      : {rank} (local_rank: {rank})\n"
        f"  exitcode  : {exitcode}\n  error_file: <N/A>\n  traceback : To enable traceback\n"
    )


@pytest.mark.parametrize(
    ("recorded", "root", "cause"),
    [
        # every rank recorded a backend error (all "comm"), and torchrun names rank 0 (exit 1):
        # rank 0's own error is the cause, not "exited ... before it reported an error"
        (
            {0: ("DistBackendError", "NCCL error in: ProcessGroupNCCL.cpp:1", True, 1),
             1: ("DistBackendError", "NCCL error in: ProcessGroupNCCL.cpp:2", True, 2)},
            (0, "1 (pid: 7)"),
            "rank 0 of the torchrun trial failed: DistBackendError: NCCL error in: "
            "ProcessGroupNCCL.cpp:1",
        ),
        # rank 1 was SIGKILLed (it recorded nothing); rank 0 recorded the lost connection
        (
            {0: ("RuntimeError", "Connection closed by peer", True, 1)},
            (1, "-9 (pid: 8)  (SIGKILL)"),
            "rank 1 of the torchrun trial was killed by SIGKILL before it reported an error",
        ),
        # the same as torch before 2.14 prints it: no signal name after the exit code
        (
            {0: ("RuntimeError", "Connection closed by peer", True, 1)},
            (1, "-9 (pid: 8)"),
            "rank 1 of the torchrun trial was killed by SIGKILL before it reported an error",
        ),
    ],
)  # fmt: skip
def test_the_cause_is_a_recorded_error_unless_the_root_rank_left_none(
    recorded: dict, root: tuple, cause: str
) -> None:
    import json

    import torch.distributed as dist

    from an_search.train.distributed import _raise_rank_error

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for rank, (kind, message, comm, seq) in recorded.items():
        record = {"type": kind, "message": message, "rank": rank, "comm": comm, "seq": seq}
        store.set(f"error/{rank}", json.dumps(record))
    with pytest.raises(WorkerError) as info:
        _raise_rank_error(store, 1, _torchrun_summary(*root), nproc=2)
    assert str(info.value).startswith(cause), str(info.value)


def test_nan_loss_on_rank_1_prunes_the_trial(tmp_path: Path, rank1_fails) -> None:
    """As in one process: a non-finite loss prunes the trial (it does not end FAIL)."""
    rank1_fails("nan")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"placement": "paper", "k": 4}))
    cfg = SearchConfig(
        "resnet10t", space=space, storage=tmp_path / "j.log", output_dir=tmp_path, train=TINY
    )
    objective, _ = prepare_search(cfg, make_objective=partial(DDPObjective, nproc=2))
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1)

    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED, trial.user_attrs
    assert "training loss became nan at epoch 1, update 2" in trial.user_attrs["prune_reason"]
    assert "fail_reason" not in trial.user_attrs
