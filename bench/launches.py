"""Kernel launches per site off the CPU: AttentiveNorm vs BatchNorm2d vs timm's SEModule.

On a GPU an eager site at ResNet widths is bound by launches and Python, not memory (README,
"On a GPU"). This counts the ATen ops that compute (one launch each on CUDA; views and
allocations left out) on PyTorch's ``meta`` device, which takes the same branches as CUDA and
needs no GPU: training forward, its backward, and evaluation without autograd (second call,
after any caching) of a float32 and of a bfloat16 map (as under autocast; float32
parameters; the meta device has no autocast, so its casts are not counted). Counts do not
depend on the shape; time does, so a lent GPU still has the last word (``bench/an_layer.py
--device cuda``).

    .venv/bin/python bench/launches.py
    .venv/bin/python bench/launches.py --heads default mlp bn-softmax --k 20
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from timm.layers.squeeze_excite import SEModule
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from an_search._compat import filter_torchscript_warning  # noqa: E402
from an_search.layers import AttentiveNorm  # noqa: E402
from an_search.layers.heads import HEADS  # noqa: E402

_SKIP = frozenset(
    {"view", "t", "expand", "unsqueeze", "detach", "select", "slice", "alias", "unbind"}
)


class CountOps(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it that compute: views and allocations left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name not in _SKIP and not name.startswith("empty"):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _eval_ops(module: nn.Module, x: torch.Tensor) -> int | None:
    """Ops of the second eval call; None where ``module`` takes no such input (SE's convs
    want autocast for a bfloat16 map, which the meta device lacks)."""
    with torch.no_grad():
        try:
            module(x)  # builds what the module caches
        except RuntimeError:
            return None
        with CountOps() as ev:
            module(x)
    return sum(ev.ops.values())


def launches(module: nn.Module, channels: int) -> tuple[int, int, int | None, int | None]:
    """(training forward, its backward, eval, eval of a bfloat16 map) ops of ``module`` (float32
    parameters) on the meta device."""
    module = module.to("meta").train()
    x = torch.empty(8, channels, 7, 7, device="meta", requires_grad=True)
    with CountOps() as fwd:
        y = module(x)
    grad = torch.empty_like(y)
    with CountOps() as bwd:
        y.backward(grad)
    module.eval()
    x = x.detach()
    ev, ev16 = _eval_ops(module, x), _eval_ops(module, x.bfloat16())
    return sum(fwd.ops.values()), sum(bwd.ops.values()), ev, ev16


def main() -> None:
    filter_torchscript_warning()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args()
    c = args.channels
    mods: dict[str, nn.Module] = {"bn2d": nn.BatchNorm2d(c), "se": SEModule(c, rd_ratio=1 / 16)}
    for head in args.heads:
        mods[f"an-{head}"] = AttentiveNorm(c, args.k, head=head)
    print(f"ATen ops per call on the meta device (as CUDA launches), K {args.k}")
    print(f"{'module':22s} {'train fwd':>9s} {'train bwd':>9s} {'eval':>5s} {'eval bf16':>9s}")
    for name, module in mods.items():
        fwd, bwd, ev, ev16 = launches(module, c)
        print(f"{name:22s} {fwd:9d} {bwd:9d} {ev if ev is not None else '-':>5} "
              f"{ev16 if ev16 is not None else '-':>9}")  # fmt: skip


if __name__ == "__main__":
    main()
