"""Evaluation-mode AttentiveNorm(BatchNorm) off the CPU in few kernels.

On a GPU an eval site is bound by kernel launches, not memory: about 0.3 ms at batch 32 on an
H200 against BatchNorm2d's 0.05 ms, whatever the shape, for fifteen ATen ops (moments, pooled
statistic, head Linear and BatchNorm1d, gate, two mixtures, the batch-norm scale and shift,
the affine). With the running statistics folded into the mixtures and the head's BatchNorm1d
into its linear layers (:func:`~an_search.layers._eval_plan.fold`, as the CPU kernel has
them), it is nine for the default head: ``var_mean``; the pooled statistic (four elementwise
ops, none for ``avg``); ``addmm``; the gate; one ``mm`` for the scales and shifts together;
``addcmul``. The folded tensors are cached per module like the CPU plan (the same key: any
parameter, buffer, submodule or folded attribute that changes refolds).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._eval_plan import _Key, fold

__all__ = ["DEVICE_PLAN_ATTR", "FOLDED_DEVICES", "device_eval"]

DEVICE_PLAN_ATTR = "_an_device_plan"  # where a module keeps it (left out of its pickled state)
_GRAD = operator.attrgetter("requires_grad")
FOLDED_DEVICES = ("cuda", "meta")  # fold in float64; meta: the tests count the ops there


@dataclass
class _DevicePlan:
    """The folded site for inputs of one dtype (``mix`` None: the site has no folded form)."""

    key: _Key
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (W^T with the norm's scale, bias)
    mix: torch.Tensor | None  # (K, 2C): the scale mixtures, then the shift mixtures
    scalars: dict[str, int | float]


def _build(an: nn.Module, dtype: torch.dtype) -> _DevicePlan:
    key = _Key.of(an, dtype)
    folded = fold(an)
    if folded is None:
        return _DevicePlan(key, [], None, {})
    (w1, s1, b1, w2, s2, b2, gn_w, gn_b, mix_a, mix_t), scalars = folded
    pairs = [(w1, s1, b1), (w2, s2, b2)][: int(scalars["layers"])]
    layers = [((w * s[:, None]).T.to(dtype).contiguous(), b.to(dtype)) for w, s, b in pairs]
    mix = torch.cat([mix_a, mix_t], 1).to(dtype)
    scalars = {**scalars, "gn_w": gn_w.to(dtype), "gn_b": gn_b.to(dtype)}
    return _DevicePlan(key, layers, mix, scalars)


def _plan(an: nn.Module, dtype: torch.dtype) -> _DevicePlan:
    plan = an.__dict__.get(DEVICE_PLAN_ATTR)
    if plan is None or not plan.key.matches(dtype):
        plan = an.__dict__[DEVICE_PLAN_ATTR] = _build(an, dtype)
    return plan


def device_eval(an: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``an(x)`` for an eval-mode batchnorm-based AttentiveNorm and a float32/float64
    (B, C, *) ``x`` with at least one spatial dim, on any layout, as the folded ops above;
    None where the plan does not apply (no folded form, autocast, autograd recording)."""
    if x.dim() < 3 or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return None
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return None  # (meta has no autocast)
    if torch.is_grad_enabled() and (x.requires_grad or any(map(_GRAD, an.parameters()))):
        return None  # the folded tensors are detached
    plan = _plan(an, x.dtype)
    if plan.mix is None:
        return None
    sc = plan.scalars
    var, mean = torch.var_mean(x, tuple(range(2, x.dim())), correction=0)  # (B, C)
    h = mean
    if sc["pool"] == 0:  # meanstd: mean / sqrt(unbiased var + eps)
        n = x[0, 0].numel()
        h = mean * torch.rsqrt(var * (n / max(n - 1, 1)) + sc["pool_eps"])
    for i, (wt, bias) in enumerate(plan.layers):
        h = torch.addmm(bias, h, wt)
        if i + 1 < len(plan.layers):
            h = torch.relu_(h)
    if sc["gn"]:
        h = F.group_norm(h, 1, sc["gn_w"], sc["gn_b"], float(sc["gn_eps"]))
    gate = sc["gate"]
    lam = F.hardsigmoid(h) if gate == 0 else torch.sigmoid(h) if gate == 1 else h.softmax(1)
    coef = (lam @ plan.mix).view(x.shape[0], 2, x.shape[1])  # scale, shift: (B, C) each
    tail = (None,) * (x.dim() - 2)  # (B, C, 1, ...) views
    return torch.addcmul(coef[(slice(None), 1, slice(None), *tail)], x,
                         coef[(slice(None), 0, slice(None), *tail)])  # fmt: skip
