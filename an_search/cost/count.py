"""Parameters and MACs of a model, with Attentive Normalization's own ops counted.

MACs come from fvcore's ``FlopCountAnalysis`` (one multiply-add = 1), plus handles for the
elementwise and reduction ops AN uses, applied only inside AN module scopes (conventions in
:mod:`an_search.cost.handles`). A model without AN gets exactly the stock fvcore figure (timm
``resnet50`` at 224x224: 4,111,512,576 MACs, 25,557,032 parameters), but for fused attention
(``scaled_dot_product_attention``, zero in stock fvcore), counted as its unfused form is.

Cross-check: ``flop_counter_macs`` is ``torch.utils.flop_counter.FlopCounterMode``'s total / 2.
That counter only knows matmul-like ops (convolution, mm/addmm/bmm, attention), so it omits
normalization, pooling and every elementwise op: it sits a little below ``macs`` (resnet50 at
224: 4,089,184,256, the difference being fvcore's batch_norm and pooling counts) and should match
fvcore's convolution + linear + matmul operators to well within 1%.

fvcore is imported lazily: it is slow to import and its tracing warns on recent torch.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from an_search._compat import filter_torchscript_warning
from an_search._modes import eval_mode
from an_search.input_size import SHAPE_ERRORS, input_error
from an_search.layers import AttentiveNorm, FoldedAttentiveNorm

from .handles import Handle, attention_macs, extra_handles

__all__ = ["UNIT", "CostReport", "count_cost"]

filter_torchscript_warning()

UNIT = (
    "MACs: one multiply-add = 1 (fvcore's 'flop'); AN modules also count their elementwise "
    "and reduction ops (see an_search.cost.handles)"
)
#: Children of an AN module that hold the replaced norm's activation/dropout: counted as stock.
_STOCK_CHILDREN = ("act", "drop")


@dataclass(frozen=True)
class CostReport:
    """Cost of one model at one input size.

    Attributes:
        params: number of parameters (shared parameters once; a folded site's: those of the
            site it folds).
        macs: multiply-adds, fvcore convention plus AN's own ops.
        by_module: MACs of each AN module, by qualified name, in model order.
        by_operator: MACs by operator over the whole model (``conv``, ``linear``, ``mean``, ...).
        unsupported_ops: aten ops fvcore met but counted as zero, with their number of calls.
        flop_counter_macs: ``FlopCounterMode`` total / 2 (matmul and convolution only); None
            where ``FlopCounterMode`` cannot run the model.
        input_shape: the traced input shape (batch first).
        unit: how ``macs`` is counted.
    """

    params: int
    macs: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    unsupported_ops: dict[str, int]
    flop_counter_macs: int | None
    input_shape: tuple[int, ...]
    unit: str = UNIT

    @property
    def an_macs(self) -> int:
        """MACs spent inside AN modules."""
        return sum(self.by_module.values())


class _ANScope:
    """Makes extra handles count only inside AN scopes and records their calls elsewhere."""

    def __init__(self, an_names: Iterable[str], ignored: Iterable[str]) -> None:
        self.an_names = frozenset(an_names)
        self.stock = frozenset(
            f"{name}.{child}" if name else child
            for name in self.an_names
            for child in _STOCK_CHILDREN
        )
        self.ignored = frozenset(ignored)
        self.outside: Counter[str] = Counter()

    def contains(self, scope_name: str) -> bool:
        """Whether the op traced under ``scope_name`` ("/a/a.b/a.b.c") is AN's own op."""
        parts = scope_name.split("/")[-1].split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in self.stock:
                return False
            if prefix in self.an_names:
                return True
        return False

    def wrap(self, handle: Handle) -> Handle:
        def _scoped(inputs: list[Any], outputs: list[Any]) -> int:
            node = outputs[0].node()
            if self.contains(node.scopeName()):
                return handle(inputs, outputs)
            if node.kind() not in self.ignored:
                self.outside[node.kind()] += 1  # unsupported, as stock fvcore reports it
            return 0

        return _scoped


def _an_module_names(model: nn.Module) -> list[str]:
    sites = (AttentiveNorm, FoldedAttentiveNorm)
    return [name for name, m in model.named_modules() if isinstance(m, sites)]


def _param_count(model: nn.Module) -> int:
    """Parameters (shared ones once), a folded site counted as the site it came from: a
    deployed model has its AN model's parameters, folded into buffers."""
    folded = sum(m.param_count for m in model.modules() if isinstance(m, FoldedAttentiveNorm))
    return sum(p.numel() for p in model.parameters()) + folded


def _example_input(model: nn.Module, input_size: tuple[int, ...], batch: int) -> torch.Tensor:
    ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    # A private generator: the same input every call, and the caller's RNG stream untouched.
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(batch, *input_size, device=device, dtype=dtype, generator=generator)


def _flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    except Exception:  # noqa: BLE001 - torch's module tracker fails on some models (PiT's
        # tuple-passing blocks: AssertionError): the cross-check is left out, not the count
        return None
    return counter.get_total_flops() // 2


def count_cost(
    model: nn.Module,
    input_size: tuple[int, ...] = (3, 224, 224),
    *,
    batch_size: int = 1,
) -> CostReport:
    """Count parameters and MACs of ``model`` in eval mode on one random input.

    The model is traced with ``torch.jit`` by fvcore (in eval mode, without gradients) and run
    once more under ``FlopCounterMode``; every module's train/eval mode is restored afterwards.
    The input lives on the model's device. AN takes its fused path on CPU only; elsewhere it
    runs its inner norm separately, which fvcore counts as about 1 more MAC per element for a
    BatchNorm base, so count a model on CPU for figures comparable with :func:`an_site_macs`.

    Args:
        model: any module whose forward takes one tensor (timm models).
        input_size: input shape without the batch dimension, e.g. ``(3, 224, 224)``.
        batch_size: batch of the traced input; MACs scale linearly with it.

    Returns:
        The :class:`CostReport`; unsupported operators are data, nothing is logged.

    Raises:
        ModelConfigError: the input is the forward's fault: more memory than there is, smaller
            than the model's downsampling, or (a model without AN) a size it cannot take.
    """
    from fvcore.nn import FlopCountAnalysis  # lazy: slow import, warns on recent torch

    an_names = _an_module_names(model)
    try:
        x = _example_input(model, tuple(input_size), batch_size)
        with eval_mode(model), torch.no_grad():
            analysis = FlopCountAnalysis(model, (x,))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            # fvcore keeps the ops it skips silently (relu, clamp, ...) in a private set;
            # without it we would only over-report unsupported ops outside AN, never miscount.
            scope = _ANScope(an_names, getattr(analysis, "_ignored_ops", ()))
            analysis.set_op_handle(**{op: scope.wrap(h) for op, h in extra_handles().items()})
            analysis.set_op_handle("aten::scaled_dot_product_attention", attention_macs)
            macs = int(analysis.total())
            flop_counter_macs = _flop_counter_macs(model, x)
    except SHAPE_ERRORS as exc:  # (torch.OutOfMemoryError is one)
        # the input's fault if too large or too small for any model, or, for a model without AN
        # (its cost is counted first), a size it cannot take; else a bug, shown as it is
        error = input_error(model, tuple(input_size), exc, batch=batch_size, plain=not an_names)
        if error is None:
            raise
        raise error from None
    per_module = analysis.by_module()
    unsupported = Counter(analysis.unsupported_ops()) + scope.outside
    return CostReport(
        params=_param_count(model),
        macs=macs,
        by_module={name: int(per_module[name]) for name in an_names},
        by_operator={op: int(n) for op, n in analysis.by_operator().items()},
        unsupported_ops=dict(sorted(unsupported.items())),
        flop_counter_macs=flop_counter_macs,
        input_shape=tuple(x.shape),
    )
