"""This tree's C eval kernel against a git revision's, side by side in one process.

A change to ``_native*.c`` is measured here rather than in two runs minutes apart: the C
sources of ``--base`` (a git revision, default HEAD) are built into a temporary library with
the flags this tree uses, and per (shape, K) the eval site of one AttentiveNorm runs on either
library (the same folded plan, only the kernel differs), interleaved with BatchNorm2d's module
in a new random order every repeat. Each call is ``--calls`` kernel calls on one input (the
site's own time, the Python around it left out: ``bench/an_layer.py`` times whole modules).
Prints each one's time a call and the paired ratios this/base, this/BN and base/BN with 95%
intervals. Both outputs are checked against each other first (the head spec and the packing
of the mixtures must not have changed between the revisions).

    .venv/bin/python bench/native_ab.py --base HEAD~1 --shapes 512x7,256x14 --ks 10 20
    .venv/bin/python bench/native_ab.py --channels-last
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import interleaved_times, paired_ratio, paired_ratio_ci  # bench/ on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from an_search.layers import AttentiveNorm, _native  # noqa: E402
from an_search.layers._eval_plan import eval_plan  # noqa: E402

SHAPES = "64x56,128x28,256x14,512x7"


def base_library(rev: str, workdir: Path) -> ctypes.CDLL:
    """The C kernels of git revision ``rev``, built into ``workdir`` and bound as this tree's."""
    for path in (*_native._SOURCES, *_native._HEADERS):
        rel = path.relative_to(ROOT).as_posix()
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{rel}"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        (workdir / path.name).write_bytes(text)
    cc = _native._compiler()
    if cc is None:
        raise SystemExit("no C compiler found (set CC)")
    target = workdir / "base.so"
    sources = [str(workdir / p.name) for p in _native._SOURCES]
    subprocess.run([cc, *_native._FLAGS, "-o", str(target), *sources, "-lm"], check=True)
    return _native._bind(ctypes.CDLL(str(target)))


def contenders(
    channels: int, size: int, k: int, args: argparse.Namespace, base: ctypes.CDLL
) -> dict[str, Callable[[], object]]:
    """BatchNorm2d's module, this tree's kernel and the base's, each ``args.calls`` calls."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, channels, size, size).contiguous(memory_format=fmt)
    bn = torch.nn.BatchNorm2d(channels).eval()
    an = AttentiveNorm(channels, k).eval()
    plan = eval_plan(an, x.dtype)
    if plan is None:
        raise SystemExit(f"no native eval plan: {_native.unavailable_reason()}")
    old = copy.copy(plan)
    suffix = "f32" if x.dtype == torch.float32 else "f64"
    old.fn, old.fn_cl = getattr(base, f"an_eval_{suffix}"), getattr(base, f"an_eval_cl_{suffix}")
    torch.testing.assert_close(plan.run(x), old.run(x), rtol=1e-5, atol=1e-5)

    def repeat(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for _ in range(args.calls):
                    fn()

        return run

    return {
        "bn": repeat(lambda: bn(x)),
        "this": repeat(lambda: plan.run(x)),
        "base": repeat(lambda: old.run(x)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--calls", type=int, default=10, help="kernel calls per timed call")
    parser.add_argument("--channels-last", action="store_true", help="NHWC feature maps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = base_library(args.base, Path(tmp))
        print(
            f"eval kernel: this tree vs {args.base}, batch {args.batch}, {args.threads} threads, "
            f"median of {args.repeats} x {args.calls} calls"
            f"{', channels-last' if args.channels_last else ''}"
        )
        print(f"{'shape':>7} {'K':>3} {'BN us':>7} {'this':>7} {'base':>7}   this/base "
              f"{'':15} this/BN {'':15} base/BN")  # fmt: skip
        for spec in args.shapes.split(","):
            channels, size = (int(v) for v in spec.split("x"))
            for k in args.ks:
                fns = contenders(channels, size, k, args, base)
                t = interleaved_times(fns, repeats=args.repeats, warmup=2,
                                      device=torch.device("cpu"))  # fmt: skip
                us = {n: statistics.median(v) / args.calls * 1e6 for n, v in t.items()}
                ratios = "  ".join(
                    f"{paired_ratio(t[a], t[b]):.3f} {paired_ratio_ci(t[a], t[b])}"
                    for a, b in (("this", "base"), ("this", "bn"), ("base", "bn"))
                )
                print(f"{spec:>7} {k:>3} {us['bn']:7.1f} {us['this']:7.1f} {us['base']:7.1f}"
                      f"   {ratios}")  # fmt: skip


if __name__ == "__main__":
    main()
