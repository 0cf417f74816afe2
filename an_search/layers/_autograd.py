"""``first_order``: the backward decorator of AN's autograd Functions.

Their backwards are computed once, from saved per-sample moments, by fused kernels: no graph
of them is recorded, so there is no second derivative. ``once_differentiable`` alone makes
that an error only on some paths: ``torch.autograd.grad(..., create_graph=True)`` followed
by a second ``grad`` silently drops AN's share of the second derivative (gradient penalties,
Hessian-vector products come out wrong). A backward that runs while autograd records
(``create_graph=True``) raises instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.autograd.function import once_differentiable

__all__ = ["DOUBLE_BACKWARD", "first_order"]

DOUBLE_BACKWARD = (
    "AttentiveNorm has no double backward: its backward runs once, in fused kernels, so "
    "create_graph=True (gradient penalties, Hessian-vector products) cannot differentiate "
    "it again; take second derivatives of a model without AN"
)

_F = TypeVar("_F", bound=Callable[..., Any])


def first_order(backward: _F) -> _F:
    """``once_differentiable(backward)``, raising :data:`DOUBLE_BACKWARD` (a RuntimeError) when
    called with ``create_graph=True``."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD)
        return once(ctx, *grads)

    return wrapper  # type: ignore[return-value]
