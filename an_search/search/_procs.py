"""The worker processes of :func:`.workers.run_workers`: start, watch, stop, and read their exits.

Each worker is ``python -m an_search.search._worker_main WORKER.json`` with its log, status file
and settings in ``RUN_DIR/workers/``; it gets SIGINT when the parent dies (``die_with_parent``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial

from an_search.errors import WorkerError
from an_search.train.distributed import die_with_parent

from ._files import make_dir
from .config import SearchConfig
from .sampling import enqueue_baselines
from .storage import fail_dead_worker_trials, heartbeat_enabled

if TYPE_CHECKING:
    from .workers import WorkerPlan

__all__ = [
    "STOP_GRACE_S",
    "OnTrial",
    "check_exits",
    "report_finished",
    "start_worker",
    "stop_workers",
    "watch_workers",
    "worker_threads",
]

#: Seconds a worker gets to stop after SIGINT before it is terminated.
STOP_GRACE_S = 60.0
OnTrial = Callable[[optuna.Study, FrozenTrial], None]


def start_worker(
    cfg: SearchConfig,
    plan: WorkerPlan,
    limit: int | None,
    sync_bn: bool,
    folder: Path,
    call: str | None = None,
) -> subprocess.Popen:
    make_dir(folder)
    threads = worker_threads(len(plan.cpus), cfg.train.threads)
    device = "cuda" if plan.gpus is not None else cfg.train.device
    wcfg = replace(cfg, train=replace(cfg.train, threads=threads, device=device))
    config = folder / f"worker-{plan.index}.json"
    config.write_text(json.dumps(wcfg.to_dict()))
    status = folder / f"worker-{plan.index}.status"
    status.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if plan.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, plan.gpus))
    root = str(Path(__file__).resolve().parents[2])  # the workers import this very package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "an_search.search._worker_main", str(config)]
    cmd += ["--nproc", str(plan.nproc), "--status", str(status)]
    cmd += ["--cpus", ",".join(map(str, plan.cpus))] if plan.cpus else []
    cmd += ["--limit", str(limit)] if limit is not None else []
    cmd += ["--call", call] if call is not None else []
    cmd += ["--sync-bn"] if sync_bn else []
    with open(folder / f"worker-{plan.index}.log", "wb") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent(signal.SIGINT),
        )


def worker_threads(cores: int, threads: int | None, environ: dict[str, str] | None = None) -> int:
    """A worker's torch threads: its share of the cores, capped by ``TrainConfig.threads`` and
    by the user's ``OMP_NUM_THREADS`` (which torch itself would honour in one process)."""
    caps = [max(1, cores), threads]
    omp = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    caps.append(int(omp) if omp.strip().isdigit() and int(omp) > 0 else None)
    return min(c for c in caps if c is not None)


def watch_workers(
    study: optuna.Study,
    procs: list[subprocess.Popen],
    seen: set[int],
    on_trial: OnTrial | None,
    poll_s: float,
) -> bool:
    """Poll until every worker exits; on SIGINT stop them all. Returns whether interrupted."""
    flag: list[int] = []
    try:  # a SIGINT must not cut a storage write here in half: note it, act on it below
        previous = signal.signal(signal.SIGINT, lambda *_: flag.append(1))
    except ValueError:  # not the main thread: Ctrl-C cannot reach this loop anyway
        previous = None
    try:
        # (every one polled: a killed worker is reaped, so its trials' process reads as gone)
        while not flag and any([p.poll() is None for p in procs]):
            report_finished(study, seen, on_trial)
            # (unowned=False: a live worker's new trial is RUNNING before it records its worker)
            if not heartbeat_enabled(study) and fail_dead_worker_trials(study, unowned=False):
                enqueue_baselines(study)  # (with heartbeats, the workers retry it)
            time.sleep(poll_s)
        if flag:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # more Ctrl-C: cleanup goes on
            stop_workers(procs)
    finally:
        if any(p.poll() is None for p in procs):  # an error here: leave no worker behind
            stop_workers(procs)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return bool(flag)


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def report_finished(study: optuna.Study, seen: set[int], on_trial: OnTrial | None) -> None:
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in seen:
            seen.add(t.number)
            if on_trial is not None:
                on_trial(study, t)


def check_exits(
    procs: list[subprocess.Popen],
    plans: list[WorkerPlan],
    on_message: Callable[[str], None] | None,
) -> None:
    failures = []
    for p, plan in zip(procs, plans, strict=True):
        if p.returncode == 0:
            continue
        status = Path(p.args[p.args.index("--status") + 1])
        try:
            why = json.loads(status.read_text()).get("error", "")
        except (OSError, ValueError):
            why = ""
        log = Path(status).with_suffix(".log")
        failures.append(f"worker {plan.index} exited with code {p.returncode}: {why or log}")
    if failures and len(failures) == len(procs):
        raise WorkerError(failures[0])
    for line in failures:
        if on_message is not None:
            on_message(line)
