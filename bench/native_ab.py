"""This tree's C kernels against a git revision's, side by side in one process.

A change to ``_native*.c`` is measured here rather than in two runs minutes apart: the C
sources of ``--base`` (a git revision, default HEAD) are built into a temporary library with
the flags this tree uses, and the same work runs on either library, interleaved with the
BatchNorm contender in a new random order every repeat:

- ``--modes eval`` (per shape and K): one AttentiveNorm's eval site, the same folded plan on
  either kernel, ``--calls`` kernel calls on one input (the Python around it left out:
  ``bench/an_layer.py`` times whole modules), against BatchNorm's own kernel call,
  ``F.batch_norm`` (BatchNorm2d's module with ``--package``, where the sites are modules);
- ``--modes train``: the site's training step (forward and backward; the library swapped in
  for the call), against BatchNorm2d's;
- ``--model NAME``: a whole timm model converted to AN (``--placement``), its training step
  or inference (``--modes train infer``) on either library, against the timm model.

``--package``: the base is the revision's whole ``an_search`` package, its Python and its C
(``_base_tree.py``), for changes to both sides or to the kernels' signatures; the sites then
run as modules (``eval`` too: the Python around the kernel included), the models converted by
either package.

Prints each one's time a call and the paired ratios this/base, this/BN and base/BN with 95%
intervals. A site's output (training: the input's gradient) on both libraries is checked
first.

    .venv/bin/python bench/native_ab.py --base HEAD~1 --shapes 512x7,256x14 --ks 10 20
    .venv/bin/python bench/native_ab.py --channels-last
    .venv/bin/python bench/native_ab.py --modes train --batch 64 --shapes 256x2,512x1
    .venv/bin/python bench/native_ab.py --model resnet10t --placement all --img-size 32 \
        --batch 64 --modes train infer
    .venv/bin/python bench/native_ab.py --package --modes train --batch 64 --shapes 512x1
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import importlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from _base_tree import import_base  # bench/ on sys.path
from _contenders import build_models, step_functions
from _timing import loops_us, paired_ratio, paired_ratio_ci

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from an_search.layers import AttentiveNorm, _native  # noqa: E402
from an_search.layers._eval_plan import eval_plan  # noqa: E402

SHAPES = "64x56,128x28,256x14,512x7"
Fns = dict[str, Callable[[], object]]
Base = ctypes.CDLL | ModuleType  # the base's library, or its package (--package)


def base_library(rev: str, workdir: Path) -> ctypes.CDLL:
    """The C kernels of git revision ``rev``, built into ``workdir`` and bound as this tree's."""
    for path in (*_native._SOURCES, *_native._HEADERS):
        rel = path.relative_to(ROOT).as_posix()
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True
        )
        if shown.returncode:
            raise SystemExit(f"--base {rev}: no {rel} there ({shown.stderr.decode().strip()})")
        (workdir / path.name).write_bytes(shown.stdout)
    cc = _native._compiler()
    if cc is None:
        raise SystemExit("no C compiler found (set CC)")
    target = workdir / "base.so"
    sources = [str(workdir / p.name) for p in _native._SOURCES]
    subprocess.run([cc, *_native._FLAGS, "-o", str(target), *sources, "-lm"], check=True)
    return _native._bind(ctypes.CDLL(str(target)))


@contextmanager
def using(lib: ctypes.CDLL) -> Iterator[None]:
    """``lib`` as the library the layers load (the training site looks it up every call; an
    eval plan keeps the kernel it was built with)."""
    _native.library()
    this = _native._STATE["lib"]
    _native._STATE["lib"] = lib
    try:
        yield
    finally:
        _native._STATE["lib"] = this


def on(lib: ctypes.CDLL, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with using(lib):
            return fn()

    return run


def _map(channels: int, size: int, args: argparse.Namespace) -> torch.Tensor:
    """A random (batch, C, size, size) input in the layout ``args`` asks for."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return torch.randn(args.batch, channels, size, size).contiguous(memory_format=fmt)


def site_eval(channels: int, size: int, k: int, args: argparse.Namespace, base: Base) -> Fns:
    """BatchNorm's eval, this tree's eval site and the base's, on one input: kernel calls
    (``F.batch_norm`` and the folded plans), or with ``--package`` the modules."""
    x = _map(channels, size, args)
    bn = torch.nn.BatchNorm2d(channels).eval()
    an = AttentiveNorm(channels, k).eval()
    if isinstance(base, ModuleType):
        old_an = _base_copy(an, base)
        torch.testing.assert_close(an(x), old_an(x), rtol=1e-5, atol=1e-5)
        fns = {"bn": lambda: bn(x), "this": lambda: an(x), "base": lambda: old_an(x)}
        return {name: torch.no_grad()(fn) for name, fn in fns.items()}
    plan = eval_plan(an, x.dtype)
    if plan is None:
        raise SystemExit(f"no native eval plan: {_native.unavailable_reason()}")
    old = copy.copy(plan)
    suffix = "f32" if x.dtype == torch.float32 else "f64"
    old.fn, old.fn_cl = getattr(base, f"an_eval_{suffix}"), getattr(base, f"an_eval_cl_{suffix}")
    torch.testing.assert_close(plan.run(x), old.run(x), rtol=1e-5, atol=1e-5)
    stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias)

    def bn_kernel() -> torch.Tensor:  # (the module's Python left out, as for the plans)
        return torch.nn.functional.batch_norm(x, *stats, False, 0.0, bn.eps)

    fns = {"bn": bn_kernel, "this": lambda: plan.run(x), "base": lambda: old.run(x)}
    return {name: torch.no_grad()(fn) for name, fn in fns.items()}


def site_train(channels: int, size: int, k: int, args: argparse.Namespace, base: Base) -> Fns:
    """BatchNorm2d's training step (forward, backward) and the AN site's on either library."""
    x = _map(channels, size, args).requires_grad_()
    grad = torch.randn_like(x)
    bn, an = torch.nn.BatchNorm2d(channels), AttentiveNorm(channels, k)

    def step(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            x.grad = None
            m.zero_grad(set_to_none=True)
            m(x).backward(grad)
            return x.grad

        return run

    this_grad = step(an)().clone()
    old = step(_base_copy(an, base)) if isinstance(base, ModuleType) else on(base, step(an))
    torch.testing.assert_close(old(), this_grad, rtol=1e-4, atol=1e-5)
    return {"bn": step(bn), "this": step(an), "base": old}


def _base_copy(an: torch.nn.Module, package: ModuleType) -> torch.nn.Module:
    """The base package's AttentiveNorm with ``an``'s configuration, state and mode."""
    layers = importlib.import_module(f"{package.__name__}.layers")
    old = layers.AttentiveNorm(an.num_features, an.k)
    old.load_state_dict(an.state_dict())
    return old.train(an.training)


def whole_model(mode: str, args: argparse.Namespace, base: Base) -> Fns:
    """The timm model, its AN conversion on this tree's kernels and a copy on the base's (with
    ``--package``: the same timm model converted by the base package)."""
    opts = SimpleNamespace(**vars(args), se_model="none", device="cpu", amp=False)
    first, an = build_models(opts).values()
    if isinstance(base, ModuleType):
        old = base.convert(copy.deepcopy(first), placement=args.placement, cost=False).model
        old.load_state_dict(an.state_dict())
    else:
        old = copy.deepcopy(an)
    variants = {"bn": first, "this": an, "base": old}
    train_step, infer = step_functions(variants, opts)
    fn = train_step if mode == "train" else infer

    def run_base() -> None:
        fn("base")

    if not isinstance(base, ModuleType):
        run_base = on(base, run_base)  # type: ignore[assignment]
    return {"bn": lambda: fn("bn"), "this": lambda: fn("this"), "base": run_base}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--modes", nargs="+", default=["eval"], choices=["eval", "train", "infer"])
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--calls", type=int, default=10, help="site calls per timed call")
    parser.add_argument("--channels-last", action="store_true", help="NHWC feature maps")
    parser.add_argument("--model", help="a timm model, whole (its training step or inference)")
    parser.add_argument("--placement", default="paper", help="--model: AN's placement policy")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument(
        "--package", action="store_true", help="the base's whole package, Python and C"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[tuple[str, str, Callable[[Base], Fns], int]] = []
    if args.model:
        rows = [(args.model, m, lambda lib, m=m: whole_model(m, args, lib), 1) for m in args.modes]
    else:
        sites = {"eval": site_eval, "train": site_train}
        for spec in args.shapes.split(","):
            c, h = (int(v) for v in spec.split("x"))
            for mode in args.modes:
                for k in args.ks:
                    build = sites.get(mode, site_eval)
                    rows.append(
                        (
                            spec,
                            f"{mode} {k}",
                            lambda lib, b=build, c=c, h=h, k=k: b(c, h, k, args, lib),
                            args.calls,
                        )
                    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.package:
            base: Base = import_base(args.base, Path(tmp))
        else:
            base = base_library(args.base, Path(tmp))
        print(
            f"{'Package' if args.package else 'C kernels'}: this tree vs {args.base}, "
            f"batch {args.batch}, {args.threads} threads, "
            f"median of {args.repeats} repeats{', channels-last' if args.channels_last else ''}"
        )
        print(f"{'what':>9} {'mode':>8} {'BN us':>9} {'this':>9} {'base':>9}   this/base "
              f"{'':15} this/BN {'':15} base/BN")  # fmt: skip
        for what, mode, build, calls in rows:
            t = loops_us(build(base), calls, args.repeats, torch.device("cpu"), warmup=2)
            us = {n: statistics.median(v) for n, v in t.items()}
            ratios = "  ".join(
                f"{paired_ratio(t[a], t[b]):.3f} {paired_ratio_ci(t[a], t[b])}"
                for a, b in (("this", "base"), ("this", "bn"), ("base", "bn"))
            )
            print(f"{what:>9} {mode:>8} {us['bn']:9.1f} {us['this']:9.1f} {us['base']:9.1f}"
                  f"   {ratios}")  # fmt: skip


if __name__ == "__main__":
    main()
