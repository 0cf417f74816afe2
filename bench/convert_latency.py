"""``an-convert resnet50`` wall time vs creating the timm model alone, in one run.

    python bench/convert_latency.py --repeats 3

Both run as fresh processes (interpreter start and imports included, as a user sees them).
Target: an-convert at most 2x the time of ``timm.create_model('resnet50')``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    exe = shutil.which("an-convert")
    convert_cmd = [exe] if exe else [sys.executable, "-m", "cli.convert"]
    cmds = {
        "timm.create_model": [
            sys.executable,
            "-c",
            f"import timm; timm.create_model({args.model!r})",
        ],
        "an-convert": [*convert_cmd, args.model, "--placement", "paper"],
        "an-convert --list-sites": [*convert_cmd, args.model, "--list-sites"],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            times[name].append(_time(cmd))
    base = statistics.median(times["timm.create_model"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:26s} {med:6.2f} s  ratio {med / base:.2f}x")


if __name__ == "__main__":
    main()
