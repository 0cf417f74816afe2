"""Per-op MAC handles for Attentive Normalization's own ops, and the counting conventions.

Unit: MACs. fvcore's ``FlopCountAnalysis`` counts one multiply-add as one "flop"; we keep that
unit and call it what it is. Everything outside AN modules is counted exactly as stock fvcore
counts it: its default handles (convolution, linear/addmm/matmul/bmm/einsum as MACs; eval-mode
``batch_norm`` 2 per element with affine, 1 without; ``group_norm``/``layer_norm`` 5 per element
with affine, 4 without; ``adaptive_avg_pool2d`` 1 per input element; upsampling as fvcore says),
and zero for every other op, but for ``scaled_dot_product_attention`` (timm's fused attention),
which stock fvcore counts as zero: its two products, as fvcore counts the unfused form's matmuls
(:func:`attention_macs`). The default handles apply inside AN modules too (the inner norm, the
head's linear layers and norms, the (B, K) @ (K, C) mixing matmuls).

Stock fvcore has no handle for elementwise and reduction ops, so AN's statistics, gate and
per-channel affine would cost nothing and an AN model would look cheaper than the BN model.
Inside an AN module's scope (its own ``forward``, inner norm, pool and head, but not its
``act``/``drop`` children, which hold the replaced norm's activation and stay stock) these
extra ops count, N being the number of elements of the tensor named:

========================================  =======================================================
op                                        MACs
========================================  =======================================================
elementwise (add, sub, mul, div, rsqrt,   N(output), in-place forms too; broadcasting counts the
clamp, relu, sigmoid, hardsigmoid,        output; a 0-dim output (traced shape arithmetic such
softmax, comparisons, ...)                as ``n / (n - 1)``) counts 0
``addcmul``, ``addcdiv``                  2 N(output): a multiply and an add. AN's one-pass
                                          ``x * a + t`` thus costs what fvcore counts for the
                                          eval-mode affine BatchNorm it replaces
reduction (mean, sum, amax, max, any,     N(input)
...)
``linalg_vector_norm``                    2 N(input): square, sum
``var_mean``, ``var``, ``std``, ...       3 N(input): sum, square, sum (one-pass moments)
``rms_norm``                              4 N(input), 5 with affine (fvcore's layer_norm rule)
view_as, expand_as, fill_, zero_, .T     0 (data movement)
========================================  =======================================================

Under ``torch.jit.trace`` AN computes its per-channel statistics with one ``var_mean`` and its
affine with one ``addcmul`` (``an_search.layers._fused``). Per BatchNorm site AN therefore
costs 5 N(feature map) plus small (B, C) and (B, K) terms, against 2 N for the eval-mode affine
BN it replaces. Outside AN scopes these extra ops count 0 and are reported in
``unsupported_ops`` exactly as stock fvcore reports them, so a model without AN gets the stock
fvcore figure.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

__all__ = [
    "OP_MACS",
    "Handle",
    "attention_macs",
    "extra_handles",
    "per_element",
    "rms_norm_macs",
]

Handle = Callable[[list[Any], list[Any]], int]

_ELEMENTWISE = (
    "add",
    "sub",
    "rsub",
    "mul",
    "div",
    "neg",
    "abs",
    "reciprocal",
    "rsqrt",
    "sqrt",
    "pow",
    "square",
    "exp",
    "log",
    "clamp",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "where",
    "relu",
    "relu6",
    "hardtanh",
    "hardsigmoid",
    "hardswish",
    "sigmoid",
    "silu",
    "gelu",
    "tanh",
    "softmax",
    "log_softmax",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
)
_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "any", "all", "adaptive_max_pool2d")
_FREE = ("view_as", "expand_as", "reshape_as", "fill_", "zero_", "numpy_T")


def _aten(name: str, *, inplace: bool = True) -> tuple[str, ...]:
    return (f"aten::{name}", f"aten::{name}_") if inplace else (f"aten::{name}",)


#: MACs of AN's own ops: aten op name -> (tensor counted: "in" or "out", MACs per element).
OP_MACS: dict[str, tuple[str, int]] = {
    **{op: ("out", 1) for name in _ELEMENTWISE for op in _aten(name)},
    **{op: ("out", 2) for name in ("addcmul", "addcdiv") for op in _aten(name)},
    **{op: ("in", 1) for name in _REDUCTIONS for op in _aten(name, inplace=False)},
    "aten::linalg_vector_norm": ("in", 2),  # square, sum (a 2-norm: the sqrt is per row)
    **{f"aten::{name}": ("in", 3) for name in ("var", "std", "var_mean", "std_mean")},
    **{f"aten::{name}": ("out", 0) for name in _FREE},
}


def _numel(value: Any) -> int:
    """Elements of a traced tensor value; 0 for non-tensors and 0-dim (shape arithmetic)."""
    if not value.isCompleteTensor():
        return 0
    sizes = value.type().sizes()
    return prod(sizes) if sizes else 0


def per_element(tensor: str, macs: int) -> Handle:
    """A handle counting ``macs`` per element of the first input (``"in"``) or output."""

    def _handle(inputs: list[Any], outputs: list[Any]) -> int:
        return macs * _numel(inputs[0] if tensor == "in" else outputs[0])

    return _handle


def rms_norm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::rms_norm(x, shape, weight, eps)``: 4 per element, 5 with a weight."""
    return (5 if inputs[2].isCompleteTensor() else 4) * _numel(inputs[0])


def attention_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::scaled_dot_product_attention(q, k, v, ...)``, which stock fvcore does not know
    (timm's fused attention: a ViT's attention counted as zero): its two products, ``q @ k^T``
    and the weights ``@ v``, as fvcore counts the unfused form's matmuls, L x S x (E + Ev) a
    batch and head; its scaling and softmax, as elementwise ops outside AN, 0."""
    shapes = [x.type().sizes() if x.isCompleteTensor() else None for x in inputs[:3]]
    if any(not shape for shape in shapes):
        return 0
    q, k, v = shapes
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def extra_handles() -> dict[str, Handle]:
    """The pure (unscoped) handles for AN's own ops, keyed by traced op name."""
    handles = {op: per_element(tensor, macs) for op, (tensor, macs) in OP_MACS.items()}
    handles["aten::rms_norm"] = rms_norm_macs
    return handles
