"""Benchmark one AttentiveNorm layer against BatchNorm2d and timm's SEModule.

Shapes are the four ResNet-50 bottleneck ``bn2`` sites (batch 32): (C, H) = (64, 56), (128, 28),
(256, 14), (512, 7). For every shape the modules are timed side by side, interleaved repeat by
repeat in a new random order each repeat (a call pays for what the previous one freed: in a
fixed order, the module after SE measured ~20% slower at 7x7). The times shown are the median
(``--stat min``: the fastest repeat); the ratios AN/BN and AN/SE are the median over repeats of
the two modules' ratio within one repeat, which cancels slow swings of a shared machine's speed
(a ratio of two medians or two minima mixes different moments):

- ``eval``:  forward in eval mode under ``torch.no_grad()``;
- ``train-fwd``: forward in train mode, autograd recording (input requires grad);
- ``train``: forward + backward in train mode (input requires grad, as inside a network).

Peak memory is the highest net allocation during one call of the mode, read from the
CPU profiler's memory events (CUDA: ``max_memory_allocated``), input excluded.

    .venv/bin/python bench/an_layer.py                 # 2 threads, K = 10 and 20
    .venv/bin/python bench/an_layer.py --ks 10 --repeats 31 --threads 1
    AN_SEARCH_NATIVE=0 .venv/bin/python bench/an_layer.py   # stock ATen ops, no C kernels
    python bench/an_layer.py --device cuda --repeats 50      # a GPU; --unfused: reference path
    python bench/an_layer.py --device cuda --triton off      # AN without the Triton kernels
    .venv/bin/python bench/an_layer.py --channels-last       # NHWC maps (C kernels of _native_cl.c)

On a machine whose cores are shared with other jobs, multi-threaded timings are dominated by
OpenMP barrier stalls (a parallel region waits for a descheduled worker: ~4-8 ms each), which
punish modules made of several ops (SE, AN) far more than one-kernel BatchNorm; the title shows
the load average before the run. Compare with ``--threads 1`` or ``--stat min`` there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from timm.layers.squeeze_excite import SEModule
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import check_device, interleaved_times, paired_ratio, paired_ratio_ci  # noqa: E402  (bench/ is on sys.path when run as a script)

from an_search._compat import filter_torchscript_warning  # noqa: E402
from an_search.layers import AttentiveNorm, _native  # noqa: E402

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
MODES = ("eval", "train-fwd", "train")
STATS = {"median": statistics.median, "min": min}
_TRITON = {"auto": None, "on": True, "off": False}  # AttentiveNorm.triton


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> Callable:
    """A closure running one eval forward, one train forward, or one train forward + backward."""

    def run() -> None:
        if mode == "eval":
            with torch.no_grad():
                module(x)
            return
        if mode == "train-fwd":
            module(x)
            return
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)

    return run


def _peak_bytes(fn: Callable, device: torch.device) -> int:
    """Highest net allocation (bytes) while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def _modules(
    channels: int, ks: list[int], fused: bool = True, triton: bool | None = None
) -> dict[str, nn.Module]:
    mods: dict[str, nn.Module] = {
        "bn": nn.BatchNorm2d(channels),
        "se": SEModule(channels, rd_ratio=1.0 / 16),
    }
    for k in ks:
        mods[f"an{k}"] = AttentiveNorm(channels, k)
        mods[f"an{k}"].fused = fused
        mods[f"an{k}"].triton = triton
    return mods


def bench_shape(
    channels: int, size: int, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """Time every module at one shape; returns one row per (mode, module)."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, channels, size, size, device=device).contiguous(memory_format=fmt)
    grad = torch.randn_like(x)
    mods = {
        name: m.to(device, memory_format=fmt)
        for name, m in _modules(channels, args.ks, args.fused, args.triton).items()
    }
    rows = []
    for mode in args.modes:
        train = mode != "eval"
        xin = x.detach().requires_grad_(train)
        fns = {}
        for name, m in mods.items():
            m.train(train)
            fns[name] = _step(m, xin, grad, mode)
        stat = STATS[args.stat]
        times = interleaved_times(fns, repeats=args.repeats, warmup=args.warmup, device=device)
        for name, fn in fns.items():
            xin.grad = None  # freed outside the measured call: peak counts what fn allocates
            mods[name].zero_grad(set_to_none=True)
            peak = _peak_bytes(fn, device) if args.memory else 0
            rows.append(
                {
                    "shape": f"{channels}x{size}",
                    "mode": mode,
                    "module": name,
                    "ms": stat(times[name]) * 1e3,
                    "times": times[name],
                    "mb": peak / 2**20,
                }
            )
    return rows


def _ratio_rows(rows: list[dict], ks: list[int]) -> list[list[str]]:
    table = []
    by_key = {(r["shape"], r["mode"], r["module"]): r for r in rows}
    for shape, mode in dict.fromkeys((r["shape"], r["mode"]) for r in rows):
        bn, se = by_key[(shape, mode, "bn")], by_key[(shape, mode, "se")]
        for k in ks:
            an = by_key[(shape, mode, f"an{k}")]
            table.append(
                [
                    shape,
                    mode,
                    str(k),
                    f"{bn['ms']:.2f}",
                    f"{se['ms']:.2f}",
                    f"{an['ms']:.2f}",
                    f"{paired_ratio(an['times'], bn['times']):.2f}",
                    paired_ratio_ci(an["times"], bn["times"]),
                    f"{paired_ratio(an['times'], se['times']):.2f}",
                    f"{bn['mb']:.1f}",
                    f"{se['mb']:.1f}",
                    f"{an['mb']:.1f}",
                ]
            )
    return table


HEADER = ["shape", "mode", "K", "BN ms", "SE ms", "AN ms", "AN/BN", "AN/BN 95% CI", "AN/SE"]
HEADER += ["BN MB", "SE MB", "AN MB"]


def _print(table: list[list[str]], plain: bool, title: str) -> None:
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(HEADER)]
        for row in [HEADER, *table]:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        return
    out = Table(title=title)
    for h in HEADER:
        out.add_column(h, justify="right")
    for row in table:
        out.add_row(*row)
    Console().print(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default=",".join(f"{c}x{h}" for c, h in SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--stat", default="median", choices=sorted(STATS), help="over repeats")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--plain", action="store_true", help="plain-text table (no rich)")
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC feature maps (and SE's convs)"
    )
    parser.add_argument(
        "--unfused", dest="fused", action="store_false",
        help="AN on its reference path (inner BatchNorm module, then the affine)",
    )  # fmt: skip
    parser.add_argument(
        "--triton", choices=sorted(_TRITON), default="auto",
        help="CUDA: AN on the Triton kernels in training only (auto), always (on), never (off)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.triton != "auto" and not args.device.startswith("cuda"):
        parser.error("--triton needs --device cuda (the Triton site runs on CUDA tensors)")
    args.triton = _TRITON[args.triton]
    filter_torchscript_warning()
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # quiet the CPU profiler used for memory
    load = os.getloadavg()[0]  # other processes on the machine distort multi-thread timings
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = []
    for spec in args.shapes.split(","):
        channels, size = (int(v) for v in spec.split("x"))
        rows += bench_shape(channels, size, args, device)
    title = (
        f"AN vs BatchNorm2d vs SEModule, batch {args.batch}, torch {torch.__version__}, "
        f"{args.device}, {args.threads} threads, {args.stat} of {args.repeats}, "
        f"load before {load:.1f}, C kernels: {_native.unavailable_reason() or 'on'}"
        f"{'' if args.fused else ', AN unfused (reference path)'}"
        f"{'' if args.triton is None else f', AN Triton kernels: {args.triton}'}"
        f"{', channels-last' if args.channels_last else ''}"
    )
    _print(_ratio_rows(rows, args.ks), args.plain, title)


if __name__ == "__main__":
    main()
