"""Entry point of one worker process: ``python -m an_search.search._worker_main CONFIG.json``.

Kept apart from ``worker`` so that ``-m`` does not load a module the package already imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from an_search.errors import ANSearchError

from .join import config_from_dict
from .worker import _SigintGuard, run_worker


def main(argv: list[str] | None = None) -> int:
    """Run one worker (started by ``run_workers``); returns the exit code.

    Exit codes: 0 done, 130 stopped by SIGINT, 2 bad input, 1 anything else; the error's
    one-line message goes to the ``--status`` file as JSON, for the parent to report.
    """
    guard = _SigintGuard()
    guard.install()
    parser = argparse.ArgumentParser(prog="python -m an_search.search._worker_main")
    parser.add_argument("config", type=Path, help="SearchConfig as JSON (to_dict)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--call", default=None, help="the worker call's id (own-trial budget)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--cpus", default=None, help="CPU ids to run on, comma list")
    parser.add_argument("--status", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    cfg = config_from_dict(json.loads(args.config.read_text()))
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    status: dict[str, Any] = {"pid": os.getpid()}
    code = 0
    try:
        run_worker(
            cfg,
            limit=args.limit,
            nproc=args.nproc,
            sync_bn=args.sync_bn,
            guard=guard,
            call=args.call,
        )
    except KeyboardInterrupt:
        code, status["stopped"] = 130, "interrupted"
    except ANSearchError as exc:
        code, status["error"] = 2, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, traceback in the log
        code, status["error"] = 1, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        import traceback

        traceback.print_exc()  # into the worker's log file
    if args.status is not None:
        args.status.write_text(json.dumps(status))
    return code


if __name__ == "__main__":
    sys.exit(main())
