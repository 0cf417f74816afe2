"""Compile every Triton kernel variant the AN site launches, for NVIDIA GPUs, without a GPU.

Triton's interpreter (tests/layers/test_triton_site.py) checks the kernels' arithmetic but not
what only the compiler enforces (types across branches, ``tl.dot`` shapes, the jit language's
rules). Triton ships its NVIDIA backend and ``ptxas``, so the real compiler runs here: the
site's forward and backward are run with recording stand-ins for the kernels (nothing is
launched), for every head, pool, mode, layout and dtype below, and each distinct (kernel,
signature, constexprs) is compiled to a cubin for each target.

    python tests/layers/triton_aot.py [--targets 90 80]     # prints "compiled N variants ..."
    python tests/layers/triton_aot.py --resources [--large]  # + registers and spills each

Run without ``TRITON_INTERPRET`` (tests/layers/test_triton_site.py starts it in a subprocess).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from triton.runtime.jit import JITFunction, mangle_type

from an_search.layers import AttentiveNorm
from an_search.layers import _triton_head as head_kernels
from an_search.layers import _triton_kernels as map_kernels
from an_search.layers._triton_site import triton_site
from an_search.layers.heads import HEADS

Call = tuple[JITFunction, dict[str, str], dict[str, object], dict[str, int]]
_LAUNCH_OPTIONS = ("num_warps", "num_stages")
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_AST_LOCK, _ast_parse = threading.Lock(), ast.parse


def _parse_one_at_a_time(*args: object, **kwargs: object) -> ast.AST:
    """``ast.parse`` under a lock: CPython 3.11 keeps the AST constructor's recursion depth in
    state shared by threads, so parses in parallel fail at random with "SystemError: AST
    constructor recursion depth mismatch" (python/cpython#106905); Triton parses each kernel's
    source in ``compile``."""
    with _AST_LOCK:
        return _ast_parse(*args, **kwargs)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the variant."""

    def __init__(self, fn: JITFunction, calls: dict[str, Call]) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
        return self._record

    def _record(self, *args: object, **kwargs: object) -> None:
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        names = [p.name for p in self.fn.params]
        values = dict(zip(names, args, strict=False)) | kwargs
        assert set(values) == set(names), (self.fn.fn.__name__, set(names) ^ set(values))
        signature, constexprs = {}, {}
        for p in self.fn.params:
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", values[p.name]
            else:
                signature[p.name] = mangle_type(values[p.name])
        key = f"{self.fn.fn.__name__} {sorted(signature.items())} {sorted(constexprs.items())}"
        self.calls.setdefault(
            f"{key} {sorted(options.items())}", (self.fn, signature, constexprs, options)
        )


def record(calls: dict[str, Call], large: bool = False) -> None:
    """Run the site over the configurations below with the kernels replaced by recorders."""
    for mod in (map_kernels, head_kernels):
        for name, fn in vars(mod).items():
            if name.endswith("_kernel") and isinstance(fn, JITFunction):
                setattr(mod, name, _Recorder(fn, calls))
    configs = [(head, pool, (6, 40, 5, 5), torch.float32, torch.contiguous_format)
               for head in HEADS for pool in ("meanstd", "avg", "avgmax")]  # fmt: skip
    configs += [
        ("default", "meanstd", (64, 512, 7, 7), torch.bfloat16, torch.contiguous_format),
        ("default", "meanstd", (32, 64, 56, 56), torch.float16, torch.channels_last),
        ("default", "avgmax", (8, 64, 7, 7), torch.bfloat16, torch.channels_last),
        ("mlp-bn", "meanstd", (8, 24, 4, 4, 4), torch.float32, torch.channels_last_3d),
        ("default", "meanstd", (5, 12), torch.float32, torch.contiguous_format),
    ]
    if large:  # the largest the site takes: batch 128, K 64 (mlp-bn: a 128-wide layer 1)
        configs += [(head, "meanstd", (128, 128, 2, 2), torch.float32, torch.contiguous_format)
                    for head in ("default", "mlp-bn")]  # fmt: skip
    for head, pool, shape, dtype, fmt in configs:
        base = {2: "batchnorm1d", 4: "batchnorm", 5: "batchnorm3d"}[len(shape)]
        k = {512: 20, 128: 64}.get(shape[1], 5)
        an = AttentiveNorm(shape[1], k, base=base, head=head, pool=pool)
        an.norm.momentum = None if head == "bn-sigmoid" else an.norm.momentum
        for training in (True, False):
            an.train(training)
            x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()
            y = triton_site(an, x)
            assert y is not None, (head, pool, shape)
            y.backward(torch.ones_like(y))
            with torch.no_grad():
                assert triton_site(an, x) is not None


def _compile(job: tuple[Call, int]) -> tuple[str, bytes]:
    """(kernel name and launch, cubin) for one variant and target."""
    (fn, signature, constexprs, options), arch = job
    src = ASTSource(fn, signature=signature, constexprs=constexprs)
    kernel = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("R", "LAYERS")}
    types = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
    name = f"sm_{arch} {fn.fn.__name__} {blocks} {options} {types} #{id(constexprs)}"
    return name, kernel.asm.get("cubin", b"")


def _resources(cubin: bytes) -> str:
    """Registers and stack (spills) per thread of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True)
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", res.stdout)
    return f"REG {found[1]:>3} STACK {found[2]:>5}" if found else res.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[90])
    parser.add_argument("--resources", action="store_true", help="registers and spills")
    parser.add_argument("--large", action="store_true", help="also batch 256 with K 64")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
    ast.parse = _parse_one_at_a_time
    calls: dict[str, Call] = {}
    record(calls, args.large)
    start = time.perf_counter()
    jobs = [(call, arch) for arch in args.targets for call in calls.values()]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # MLIR passes and ptxas: no GIL
        built = dict(pool.map(_compile, jobs))
    assert all(built.values()), [name for name, cubin in built.items() if not cubin]
    if args.resources:
        for name, cubin in sorted(built.items()):
            print(f"{_resources(cubin)}  {name}")
    kernels = len({fn.fn.__name__ for fn, *_ in calls.values()})
    print(
        f"compiled {len(calls)} variants of {kernels} kernels for sm_"
        f"{', sm_'.join(map(str, args.targets))} in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
