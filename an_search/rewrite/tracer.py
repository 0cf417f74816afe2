"""A norm-aware torch.fx tracer used only to find and label normalization sites.

Plain ``torch.fx.symbolic_trace`` treats only ``torch.nn`` classes as leaves, so timm norms such as
``LayerNorm2d`` or ``BatchNormAct2d`` are traced through and vanish from the graph. This tracer
keeps every norm class, every conv class (timm's weight-standardised convs included), timm's
notrace modules (``timm.layers._fx``) and any already-inserted ``AttentiveNorm`` as leaves, and
autowraps timm's notrace functions.

The graph is never turned into a ``GraphModule``: callers read it to label sites and then change
the ORIGINAL module tree by name (a GraphModule loses timm methods and freezes train/eval
branches). Tracing runs in eval mode; every module's mode, and the root's attributes (fx stores
tensor constants on the root), are put back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from an_search._modes import eval_mode

__all__ = ["SiteTracer", "TraceResult", "is_norm_module", "norm_classes", "trace_model"]

# Generic torch bases: every subclass is a norm (BatchNorm*, SyncBatchNorm, InstanceNorm*, ...).
_TORCH_NORM_BASES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def norm_classes() -> tuple[type[nn.Module], ...]:
    """All classes treated as normalization layers (supported by AN or not).

    Returns:
        ``an_search.layers.NORM_CLASSES`` plus torch's generic norm base classes.
    """
    from an_search.layers import NORM_CLASSES

    return tuple(dict.fromkeys((*NORM_CLASSES, *_TORCH_NORM_BASES)))


def _attentive_norm_class() -> tuple[type[nn.Module], ...]:
    from an_search.layers import AttentiveNorm

    return (AttentiveNorm,)


def is_norm_module(module: nn.Module) -> bool:
    """True for a normalization module (a candidate site); False for an ``AttentiveNorm``."""
    if isinstance(module, _attentive_norm_class()):
        return False
    return isinstance(module, norm_classes())


class SiteTracer(fx.Tracer):
    """fx tracer whose leaves are norms, timm notrace modules and torch.nn modules.

    Every node gets ``node.meta["an_scope"]``: the qualified name of the module whose forward
    emitted it (``""`` for the root), in the spirit of torchvision's ``NodePathTracer``.

    Args:
        leaf_types: Extra module classes never traced through.
        autowrap_functions: Functions recorded as single ``call_function`` nodes.
    """

    def __init__(
        self,
        leaf_types: tuple[type[nn.Module], ...],
        autowrap_functions: tuple[Callable[..., Any], ...] = (),
    ) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self._qualname = ""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Leaf if one of ``leaf_types``, else torch.fx's default (torch.nn classes)."""
        if isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Track the qualified name of the module being traced."""
        outer = self._qualname
        try:
            self._qualname = self.path_of_module(m)
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._qualname = outer

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        """Record the emitting module's qualified name on the new node."""
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta["an_scope"] = self._qualname
        return proxy


@dataclass(frozen=True)
class TraceResult:
    """Outcome of :func:`trace_model`: a graph, or the one-line reason there is none."""

    graph: fx.Graph | None
    fallback_reason: str | None = None


def _leaf_types() -> tuple[type[nn.Module], ...]:
    from timm.layers import get_notrace_modules

    # Conv subclasses (timm StdConv2d, ScaledStdConv2d) stay whole so roles can read their
    # kernel; their weight standardisation (F.batch_norm on weights) never enters the graph.
    convs = (nn.modules.conv._ConvNd,)
    extra = (*norm_classes(), *_attentive_norm_class(), *convs)
    return tuple(dict.fromkeys((*get_notrace_modules(), *extra)))


def _autowrap_functions() -> tuple[Callable[..., Any], ...]:
    from timm.layers import get_notrace_functions

    # timm also accepts names here; fx only wraps real Python functions.
    return tuple(f for f in get_notrace_functions() if callable(f) and hasattr(f, "__globals__"))


@contextmanager
def _eval_and_restore(model: nn.Module) -> Iterator[None]:
    """Eval mode while tracing; put back every module's mode and the root's attribute dicts."""
    saved = {k: dict(getattr(model, k)) for k in ("_parameters", "_buffers", "_modules")}
    plain = set(vars(model))
    try:
        with eval_mode(model):
            yield
    finally:
        for k, d in saved.items():
            getattr(model, k).clear()
            getattr(model, k).update(d)
        for extra in set(vars(model)) - plain:  # fx's _tensor_constantN attributes
            delattr(model, extra)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def trace_model(model: nn.Module) -> TraceResult:
    """Symbolically trace ``model`` (eval mode) with :class:`SiteTracer`.

    Args:
        model: Any module; it is left exactly as it was (modes, attributes).

    Returns:
        A :class:`TraceResult` holding the graph, or ``graph=None`` and a one-line
        ``fallback_reason`` when the model cannot be traced (e.g. data-dependent control flow).
    """
    tracer = SiteTracer(_leaf_types(), _autowrap_functions())
    with _eval_and_restore(model), torch.no_grad():
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
            return TraceResult(None, f"symbolic tracing failed ({_one_line(exc)})")
    return TraceResult(graph)
