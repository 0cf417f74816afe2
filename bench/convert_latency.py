"""``an-convert resnet50`` wall time vs creating the timm model alone, in one run.

    python bench/convert_latency.py --repeats 3

Both run as fresh processes (interpreter start and imports included, as a user sees them),
after one warm-up run each, in a new random order every repeat; the ratio is the median of
the within-repeat ratios (its 95% interval in brackets from 6 repeats).
Target: an-convert at most 2x the time of ``timm.create_model('resnet50')``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import paired_ratio, paired_ratio_ci  # noqa: E402  (bench/ on sys.path)


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    convert_cmd = [sys.executable, "-m", "cli.convert"]  # this interpreter's an-convert
    cmds = {
        "timm.create_model": [
            sys.executable,
            "-c",
            f"import timm; timm.create_model({args.model!r})",
        ],
        "an-convert": [*convert_cmd, args.model, "--placement", "paper"],
        "an-convert --list-sites": [*convert_cmd, args.model, "--list-sites"],
    }
    for cmd in cmds.values():  # warm-up: the page cache, and the C kernels' first build
        _time(cmd)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    order = list(cmds)
    for _ in range(args.repeats):
        random.shuffle(order)  # side by side, in a new order every repeat
        for name in order:
            times[name].append(_time(cmds[name]))
    base = times["timm.create_model"]
    for name, ts in times.items():
        ratio = paired_ratio(ts, base)
        print(
            f"{name:26s} {statistics.median(ts):6.2f} s  ratio {ratio:.2f}x "
            f"{paired_ratio_ci(ts, base)}"
        )


if __name__ == "__main__":
    main()
