"""The host's time for one AN site on a GPU: what a host-bound step pays per site.

A site at a small map (the GPU's work far below the host's), called in a loop with no
synchronisation but at the end, takes its host time a call: Python, dispatch and launches. Per
mode, BatchNorm2d's module, the AN site's (its default path: the folded site in evaluation,
the Triton site in training; ``--triton off``: ATen ops) and the same AN site with Triton's
own launches (``kernel[grid]``, not ``_triton_launch``'s direct ones), timed interleaved in a
new random order every repeat, with the paired ratio of the last two; then, with ``--python N``,
cProfile's top N functions of AN's evaluation, training forward and (called in the main thread,
where cProfile sees it) Triton backward; and the host's cost of single launches for scale.

``--noop`` (no GPU needed): the Triton site's own host work on the CPU, its kernels replaced by
launches that do nothing: Python, allocations and the autograd node, what a change to
``_triton_site.py``'s host side moves (launches excluded); ``--base REV`` times a git
revision's site beside this tree's, interleaved in the same process (``_base_tree.py``).

    python bench/site_host.py --device cuda [--channels 256 --size 7 --batch 64] [--python 20]
    .venv/bin/python bench/site_host.py --noop [--base HEAD~1] [--head mlp] [--python 20]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _base_tree import import_base  # bench/ on sys.path
from _timing import check_device, loops_us, paired_ratio, paired_ratio_ci, python_top
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from an_search.layers import AttentiveNorm  # noqa: E402
from an_search.layers import _triton_launch as tl  # noqa: E402
from an_search.layers import _triton_site as ts  # noqa: E402

_TRITON = {"auto": None, "on": True, "off": False}


def host_us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Microseconds a call of ``fn`` in a loop, synchronised only at its ends."""
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


class _Noop:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` launches nothing."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _noop_modes(package: str, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The forward and training step of ``package``'s Triton site (``an_search``, or a base
    revision's copy) on its own module and input, its kernels replaced by no-ops."""
    layers = importlib.import_module(f"{package}.layers")
    site_mod = importlib.import_module(f"{package}.layers._triton_site")
    for name in ("_triton_kernels", "_triton_head"):
        mod = importlib.import_module(f"{package}.layers.{name}")
        for attr in dir(mod):
            if attr.endswith("_kernel"):
                setattr(mod, attr, _Noop())
    torch.manual_seed(0)
    c, s = args.channels, args.size
    an = layers.AttentiveNorm(c, args.k, head=args.head).train()
    x = torch.randn(args.batch, c, s, s, requires_grad=True)
    g = torch.randn_like(x)
    params = list(an.parameters())

    def step() -> None:  # (grads set to None, as optimizer.zero_grad() does)
        x.grad = None
        for p in params:
            p.grad = None
        site_mod.triton_site(an, x).backward(g)

    return {"forward": lambda: site_mod.triton_site(an, x), "step": step}


def noop_report(args: argparse.Namespace) -> None:
    """The Triton site's host time a call on the CPU with no-op kernels (``--noop``); with
    ``--base REV``, that revision's beside it, interleaved, and the paired ratios."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        this = _noop_modes("an_search", args)
        fns = {f"this {m}": fn for m, fn in this.items()}
        if args.base:
            base = import_base(args.base, Path(tmp)).__name__
            fns |= {f"base {m}": fn for m, fn in _noop_modes(base, args).items()}
        c, s = args.channels, args.size
        print(f"Triton site, no-op kernels, CPU host us a call (median of {args.repeats} x "
              f"{args.calls}): batch {args.batch}, {c}x{s}x{s}, K {args.k}, head {args.head}"
              + (f"; this tree vs {args.base}" if args.base else ""))  # fmt: skip
        times = loops_us(fns, args.calls, args.repeats, torch.device("cpu"))
    for mode in ("forward", "step"):
        t = times[f"this {mode}"]
        line = f"{mode:>10s} {statistics.median(t):8.1f}  (min {min(t):.1f})"
        if args.base:
            b = times[f"base {mode}"]
            line += (f"   base {statistics.median(b):8.1f}  this/base {paired_ratio(t, b):.3f} "
                     f"{paired_ratio_ci(t, b)}")  # fmt: skip
        print(line)
    if args.python:
        print(python_top(this["step"], args.calls, args.python))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the Triton site); --noop: the CPU")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--calls", type=int, default=100, help="calls a timing")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timings of each")
    p.add_argument("--triton", choices=list(_TRITON), default="auto")
    p.add_argument("--python", type=int, default=0, help="cProfile's top functions")
    p.add_argument("--noop", action="store_true", help="the Triton site's host work on a CPU")
    p.add_argument("--base", help="--noop: also a git revision's site, side by side")
    p.add_argument("--head", default="default", help="--noop: the attention head")
    args = p.parse_args()
    if args.noop:
        noop_report(args)
        return
    check_device(p, args.device)  # (a CPU machine: --noop times the site's host work)
    dev = torch.device(args.device)
    c, s = args.channels, args.size
    x = torch.randn(args.batch, c, s, s, device=dev)
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)
    bn = nn.BatchNorm2d(c).to(dev)
    an = AttentiveNorm(c, args.k).to(dev)
    an.triton = _TRITON[args.triton]
    print(f"device={dev} batch={args.batch} map={c}x{s}x{s} K={args.k} torch={torch.__version__}"
          f" triton={args.triton}")  # fmt: skip

    def modes(m: nn.Module) -> dict[str, Callable[[], object]]:
        def ev() -> object:
            with torch.no_grad():
                return m(x)

        def step() -> None:  # (gradients cleared: no accumulation, as zero_grad would)
            xg.grad = None
            for param in m.parameters():
                param.grad = None
            m(xg).backward(g)

        return {"eval": ev, "train forward": lambda: m(xg), "train step": step}

    rows = {name: modes(m) for name, m in (("bn", bn), ("an", an))}

    def usual(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:  # AN with Triton's own launches (kernel[grid]) for this call
            tl._DIRECT = False
            try:
                return fn()
            finally:
                tl._DIRECT = direct

        return run

    direct = tl._DIRECT
    rows["an, Triton's launches"] = {mode: usual(fn) for mode, fn in rows["an"].items()}
    names = list(rows)
    print(f"host us a call, median of {args.repeats} interleaved repeats of {args.calls} calls"
          f"{'' if direct else ' (direct launches off: the last two rows alike)'}")  # fmt: skip
    print(f"{'mode':>14s} {'BN':>8s} {'AN':>8s} {'AN-usual':>9s} {'AN - BN':>8s} "
          f"{'AN/AN-usual':>12s}")  # fmt: skip
    for mode in rows["bn"]:
        for m in (bn, an):
            m.train(mode != "eval")
        times = loops_us({n: rows[n][mode] for n in names}, args.calls, args.repeats, dev)
        b_us, a_us, u_us = (statistics.median(times[n]) for n in names)
        ratio = paired_ratio(times["an"], times[names[2]])
        print(f"{mode:>14s} {b_us:8.1f} {a_us:8.1f} {u_us:9.1f} {a_us - b_us:8.1f} {ratio:12.3f}")
    y, col = torch.empty_like(x), x[:, :, :1, :1].contiguous()
    launches = {
        "x.add_(1)": lambda: x.add_(1.0),
        "torch.empty(64, 256)": lambda: torch.empty(64, 256, device=dev),
        "torch.addcmul (B,C,1,1)": lambda: torch.addcmul(col, x, col, out=y),
    }
    for name, fn in launches.items():
        print(f"{name:>28s} {host_us(fn, args.calls, dev):8.1f} us")
    if not args.python:
        return
    an.eval()
    print("\n=== eval\n" + python_top(rows["an"]["eval"], args.calls, args.python))
    an.train()
    print("=== train forward\n" + python_top(rows["an"]["train forward"], args.calls, args.python))
    site = ts.site(an, xg, None)
    if site is not None and dev.type == "cuda" and ts.triton_wanted(an.triton, True, dev):
        with torch.no_grad():
            y, saved = ts._forward(site, xg)
        head = site.params[2:]
        w1, _, n1w, _, w2, _, n2w, _ = head
        full = (xg, an.weight, an.bias, w1, n1w, w2, n2w, *saved)
        table = python_top(lambda: ts._backward(site, full, g), args.calls, args.python)
        print("=== Triton backward (_backward in the main thread)\n" + table)


if __name__ == "__main__":
    main()
