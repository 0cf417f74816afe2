"""Side-by-side timing helpers for the benchmarks: interleaved repeats, medians, ratios."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import time
from collections.abc import Callable
from math import comb

import torch


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """A usage error (exit 2), not a traceback from torch.cuda, for a device this machine lacks."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device here; run it on a GPU or use --device cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    stat: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
    """Seconds per call of each fn (median, or ``stat``) over :func:`interleaved_times`."""
    times = interleaved_times(fns, repeats=repeats, warmup=warmup, device=device)
    return {name: stat(ts) for name, ts in times.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[i] / b[i] (times of the same repeat of
    :func:`interleaved_times`): a slow stretch of the machine slows both calls of a repeat,
    so the ratio cancels it where a ratio of two medians or two minima would not."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median of ``values`` (sign test): the
    order statistics ``x_(k)`` and ``x_(n+1-k)`` for the largest k with
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so it holds the median with probability at least
    ``level`` whatever the noise's distribution (n = 9: 2nd and 8th, 96%). None where n is too
    small for ``level`` (under 6 at 95%)."""
    n, k, below = len(values), 0, 0.0
    while k < n:
        below += comb(n, k) / 2**n  # P(B <= k)
        if below > (1.0 - level) / 2:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def paired_ratio_ci(a: list[float], b: list[float], level: float = 0.95) -> str:
    """:func:`median_ci` of the within-repeat ratios a[i] / b[i], as ``[lo-hi]`` (``[n/a]``
    for too few repeats): the range that the paired ratio's true median lies in."""
    ci = median_ci([x / y for x, y in zip(a, b, strict=True)], level)
    return "[n/a]" if ci is None else f"[{ci[0]:.3f}-{ci[1]:.3f}]"


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds of each call of each fn, repeat by repeat, measured round-robin so noise hits
    all alike, in a new (seeded) random order every repeat: a call pays for what the one
    before it left behind (freed memory returned to the OS, caches), so no fn may always follow
    the same one (a rotation would keep the neighbours)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    names, rng = list(fns), random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def loops_us(
    fns: dict[str, Callable[[], object]],
    calls: int,
    repeats: int,
    device: torch.device,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Microseconds a call of each fn, per repeat: ``calls`` calls in a loop synchronised only
    at its ends, the loops timed by :func:`interleaved_times` (a new random order every
    repeat)."""

    def loop(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                fn()

        return run

    times = interleaved_times(
        {n: loop(fn) for n, fn in fns.items()}, repeats=repeats, warmup=warmup, device=device
    )
    return {n: [t / calls * 1e6 for t in ts] for n, ts in times.items()}


def python_top(fn: Callable[[], object], calls: int, top: int) -> str:
    """cProfile's table of the ``top`` functions by own time over ``calls`` calls of ``fn``
    (this thread only)."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()
