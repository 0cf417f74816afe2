"""Evaluation-mode AttentiveNorm(BatchNorm) off the CPU in few kernels.

On a GPU an eval site is bound by kernel launches, not memory: about 0.3 ms at batch 32 on an
H200 against BatchNorm2d's 0.05 ms, whatever the shape, for fifteen ATen ops (moments, pooled
statistic, head Linear and BatchNorm1d, gate, two mixtures, the batch-norm scale and shift,
the affine). With the running statistics folded into the mixtures and the head's BatchNorm1d
into its linear layers (:func:`~an_search.layers._eval_plan.fold`, as the CPU kernel has
them), it is eight for the default head: ``var_mean``; the pooled statistic (three
elementwise ops, none for ``avg``); ``addmm``; the gate; one ``mm`` for the scales and shifts
together; ``addcmul``. The folded tensors are cached per module like the CPU plan (the same
key: any parameter, buffer, submodule or folded attribute that changes refolds).

Half and bfloat16 maps (an AMP validation pass, a half model): the statistics accumulate in
float32 (:func:`_pooled`), the head and the mixtures run in float32 with autocast switched off
inside the site (under autocast each would cast the weights again, every call), and the output
is computed from the float32 scales and shifts and rounded once to the map's dtype. The mixed
dtypes cost no launch (CUDA kernels cast as they load and store): eight ops for bfloat16 as
for float32 (it was fourteen, with float16's ``E[x^2] - E[x]^2`` and two casts; under bfloat16
autocast an H100 ran AN-ResNet-50's inference at the pace of the CPU's launches, 1.9x
ResNet-50's time with fourteen, 1.6x with ten), 13 for float16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ._eval_plan import _Key, cached_plan, fold, records_grad
from ._fused import _device_moments, bessel

__all__ = [
    "DEVICE_PLAN_ATTR",
    "FOLDED_DEVICES",
    "autocast_off",
    "device_eval",
    "device_plan",
    "plan_dtype",
    "recording",
    "run_device_plan",
]

_T = TypeVar("_T")
DEVICE_PLAN_ATTR = "_an_device_plan"  # where a module keeps it (left out of its pickled state)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_DTYPES = (*_LOW_PRECISION, torch.float32, torch.float64)
FOLDED_DEVICES = ("cuda", "meta")  # fold in float64; meta: the tests count the ops there


@dataclass
class _DevicePlan:
    """The folded site for inputs of one dtype (``mix`` None: the site has no folded form)."""

    key: _Key
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (W^T with the norm's scale, bias)
    mix: torch.Tensor | None  # (K, 2C): the scale mixtures, then the shift mixtures
    scalars: dict[str, int | float | torch.Tensor]  # eps_t: the pool's eps, a (1,) tensor


def _build(an: nn.Module, dtype: torch.dtype) -> _DevicePlan:
    key = _Key.of(an, dtype)
    folded = fold(an)
    if folded is None:
        return _DevicePlan(key, [], None, {})
    return device_plan(key, *folded, dtype)


def device_plan(
    key: _Key | None,
    tensors: list[torch.Tensor],
    scalars: dict[str, int | float],
    dtype: torch.dtype,
) -> _DevicePlan:
    """The ops' tensors in ``dtype`` from :func:`~._eval_plan.fold`'s float64 ones (the
    folded module, :mod:`.folded`, keeps those as buffers)."""
    w1, s1, b1, w2, s2, b2, gn_w, gn_b, mix_a, mix_t = tensors
    pairs = [(w1, s1, b1), (w2, s2, b2)][: int(scalars["layers"])]
    layers = [((w * s[:, None]).T.to(dtype).contiguous(), b.to(dtype)) for w, s, b in pairs]
    mix = torch.cat([mix_a, mix_t], 1).to(dtype)
    eps = torch.full((1,), float(scalars.get("pool_eps", 0.0)), dtype=dtype, device=mix.device)
    scalars = {**scalars, "gn_w": gn_w.to(dtype), "gn_b": gn_b.to(dtype), "eps_t": eps}
    return _DevicePlan(key, layers, mix, scalars)


def plan_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the ops' tensors take for maps of ``x``'s: float32 for half and bfloat16."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _pooled(x: torch.Tensor, sc: dict) -> torch.Tensor:
    """The head's input (B, C): the per-sample mean, or ``meanstd``'s mean / sqrt(unbiased
    var + eps); float32 for half and bfloat16 maps, accumulated in float32 without a float32
    copy of the map. bfloat16 (autocast's dtype on a GPU, float32's range): ``var_mean``'s one
    pass, whose float32 accumulators are rounded once to bfloat16 on the way out (both within
    2^-8 relative); float16, whose variance can overflow: ``_fused``'s device moments,
    ``E[x^2] - E[x]^2`` from ``mean`` and ``vector_norm`` in float32."""
    dims, n = tuple(range(2, x.dim())), math.prod(x.shape[2:])
    if sc["pool"] == 1:  # avg
        return x.mean(dims, dtype=torch.float32 if x.dtype in _LOW_PRECISION else None)
    eps = sc["eps_t"]  # (1,), the plan's dtype: float32 for half and bfloat16 maps
    if x.dtype != torch.float16:
        if isinstance(n, int):  # (a single value: variance 0, as the pool has it)
            var, mean = torch.var_mean(x, dims, correction=1 if n > 1 else 0)
        else:  # traced (a tensor) or exported (a SymInt): no branch on the size baked in
            var, mean = torch.var_mean(x, dims, correction=0)
            var = var * bessel(n)
        if recording(x):  # (the folded module's: out-of-place, for autograd)
            return torch.add(var, eps).rsqrt() * mean
        return torch.add(var, eps).rsqrt_().mul_(mean)  # (bfloat16 + float32 (1,): float32)
    mean, var = _device_moments(x.flatten(2), 2)  # float32, biased
    if recording(x) or not isinstance(n, int):
        return mean * (var * bessel(n) + eps).rsqrt()
    return mean * var.mul_(bessel(n)).add_(eps).rsqrt_()


def device_eval(an: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``an(x)`` for an eval-mode batchnorm-based AttentiveNorm and a (B, C, *) ``x`` with at
    least one spatial dim, of any float dtype and layout, as the folded ops above (half and
    bfloat16 maps: statistics, head and mixtures in float32, autocast or not; the output in
    ``x``'s dtype); None where the plan does not apply (no folded form, autograd recording)."""
    if x.dim() < 3 or x.dtype not in _DTYPES or x.numel() == 0:
        return None
    if records_grad(an, x):
        return None
    plan = cached_plan(an, DEVICE_PLAN_ATTR, plan_dtype(x), _build)
    return None if plan.mix is None else run_device_plan(plan, x)


def run_device_plan(plan: _DevicePlan, x: torch.Tensor) -> torch.Tensor:
    """The folded site's ops on ``x`` (any device; autocast off inside)."""
    dev = x.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):
        return _run(plan, x)
    return autocast_off(dev, _run, plan, x)


def autocast_off(dev: str, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` with ``dev``'s autocast (on) switched off: the flag toggled in eager
    (``torch.autocast(enabled=False)`` took 4x its time), an autocast region while compiling
    (Dynamo before torch 2.14 breaks its graph on the flag)."""
    if torch.compiler.is_compiling():
        with torch.autocast(dev, enabled=False):
            return fn(*args)
    torch.set_autocast_enabled(dev, False)
    try:
        return fn(*args)
    finally:
        torch.set_autocast_enabled(dev, True)


def _run(plan: _DevicePlan, x: torch.Tensor) -> torch.Tensor:
    sc = plan.scalars
    h = _pooled(x, sc)
    for i, (wt, bias) in enumerate(plan.layers):
        h = torch.addmm(bias, h, wt)
        if i + 1 < len(plan.layers):
            h = torch.relu_(h)
    if sc["gn"]:
        h = F.group_norm(h, 1, sc["gn_w"], sc["gn_b"], float(sc["gn_eps"]))
    gate = sc["gate"]
    lam = F.hardsigmoid(h) if gate == 0 else torch.sigmoid(h) if gate == 1 else h.softmax(1)
    # scale, shift: (B, C, 1, ...) each (one unbind: half the host time of two indexings)
    coef = (lam @ plan.mix).view((x.shape[0], 2, x.shape[1]) + (1,) * (x.dim() - 2))
    scale, shift = coef.unbind(1)
    if recording(x):  # (the folded module's: autograd through x)
        return torch.addcmul(shift, x, scale).to(x.dtype)
    y = torch.empty_like(x)  # (a half map: computed with the float32 coefficients, rounded once)
    return torch.addcmul(shift, x, scale, out=y)


def recording(x: torch.Tensor) -> bool:
    """Whether autograd records through ``x`` (device_eval itself never runs then; the
    folded module's ops do, and its CPU kernel does not). Under ``torch.jit.trace`` always:
    one graph whatever the grad mode (its check re-traces under ``no_grad``)."""
    return torch.jit.is_tracing() or (x.requires_grad and torch.is_grad_enabled())
