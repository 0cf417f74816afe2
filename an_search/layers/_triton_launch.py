"""Triton launches with less host time: a kernel's compiled form called directly once known.

``kernel[grid](*args)`` costs the host about 25-40 us on the GPU machines here (H100 VM, Triton
3.6: the binder's specialisation, the cache key, the current device and stream through
``torch.cuda``, the launch metadata), two to three ATen launches; a site's ten launches were a
third of its host time in a training step, and eager AN-ResNet-50's training step is bound by
the host (bench/profile_step.py: the GPU computed 36 ms of a 52-68 ms step, ResNet-50's own
36 ms). :func:`launch` keys each call by what Triton specialises on (every int and bool by
value, each tensor's dtype, the constexprs and launch options by name, the current device;
pointers must all be 16-byte aligned, else the usual path) and, once a key has been launched
the usual way, calls that :class:`~triton.compiler.CompiledKernel`'s launcher itself with the
arguments Triton's binder gave it, in its order: the same kernel on the same arguments, on the
current stream.

The direct call is taken only where it is known to be Triton's own (Triton 3.3 and later,
where ``JITFunction.run`` ends in ``kernel.run(grid, stream, function, packed_metadata,
launch_metadata, hooks, *bound_args)``), with no launch hooks (None or, from Triton 3.6, an
empty ``HookChain``; a profiler's hooks take the usual path), on CUDA tensors, and after the
binder's bound arguments matched the order rebuilt here on the key's first launch; anything
else takes ``kernel[grid]``. ``AN_SEARCH_TRITON_DIRECT=0`` always does.

Measured on an H100 (``bench/site_host.py``, a 256x7x7 site at batch 64, one run each): the
host's time of a training step beyond BatchNorm2d's, 1055 us against 1183-1301 us through
``kernel[grid]`` (three runs); ``tests/test_cuda.py`` checks the outputs, gradients and buffers
equal the usual path's bit for bit.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

__all__ = ["DIRECT_ENV", "launch"]

DIRECT_ENV = "AN_SEARCH_TRITON_DIRECT"
_ALIGN = 16  # Triton specialises pointers (and ints) on divisibility by 16
_EMPTY = inspect.Parameter.empty
_Rest = tuple[tuple[str, Any], ...]  # the parameters after the positional ones, with defaults
_cache: dict[tuple, tuple[Any, _Rest]] = {}  # key -> (CompiledKernel, its rest)
_MAX_KEYS = 4096  # ints are keyed by value: many input shapes make many keys; then start over
_refused: set[int] = set()  # ids of kernels whose direct call could not be set up


def _knobs() -> Any:
    """``triton.knobs`` (Triton 3.3 on), or None."""
    try:
        import triton  # noqa: PLC0415

        return getattr(triton, "knobs", None)
    except ImportError:  # pragma: no cover
        return None


_KNOBS = _knobs()
_DIRECT = os.environ.get(DIRECT_ENV) != "0" and _KNOBS is not None


def _hookless(hook: Any) -> bool:
    """No launch hook: None, or (Triton 3.6 on) an empty ``HookChain``."""
    return hook is None or getattr(hook, "calls", None) == []


def _key(kernel: Any, args: tuple, kwargs: dict) -> tuple | None:
    """The call's specialisation (module doc): every int and bool by value, each tensor's dtype;
    None where a pointer is not 16-byte aligned (Triton keys each one: the usual path), a tensor
    is not on a GPU or an argument is something else. (A loop over types, not isinstance chains:
    it runs every launch.)"""
    key: list = [id(kernel), tuple(kwargs)]
    ptrs = 0
    for a in (*args, *kwargs.values()):
        t = type(a)
        if t is int:
            key.append(a)  # exact: 1, divisibility and the integer width follow from it
        elif t is float:
            key.append(float)  # fp32 scalars, never specialised
        elif t is bool or a is None:
            key.append((t, a))  # (True == 1: kept apart from ints)
        elif isinstance(a, torch.Tensor):
            if not a.is_cuda:
                return None
            key.append(a.dtype)
            ptrs |= a.data_ptr()
        else:
            return None
    return tuple(key) if ptrs % _ALIGN == 0 else None


def _rest(kernel: Any, n_args: int) -> _Rest:
    """The parameters of a JITFunction after its ``n_args`` positional ones, with their defaults
    (``inspect.Parameter.empty`` where none)."""
    return tuple((p.name, p._param.default) for p in kernel.params[n_args:])


def _bound(args: tuple, kwargs: dict, rest: _Rest) -> list | None:
    """All of a kernel's parameters in declaration order, or None where one is missing."""
    out = list(args)
    for name, default in rest:
        value = kwargs.get(name, default)
        if value is _EMPTY:
            return None
        out.append(value)
    return out


def _keep(key: tuple, entry: tuple[Any, _Rest]) -> None:
    """``_cache[key] = entry``, the cache emptied first once it holds ``_MAX_KEYS`` keys (a
    dropped key's next launch takes the usual path and is kept again)."""
    if len(_cache) >= _MAX_KEYS:
        _cache.clear()
    _cache[key] = entry


def _prepare(kernel: Any, key: tuple, args: tuple, kwargs: dict, compiled: Any) -> None:
    """Keep ``compiled`` for ``key`` where the binder's bound arguments are those
    :func:`_bound` rebuilds (checked once, here); else never call ``kernel`` directly."""
    try:
        rest = _rest(kernel, len(args))
        params = _bound(args, kwargs, rest)
        binder = kernel.device_caches[key[0]][-1]
        bound = list(binder(*args, **kwargs)[0].values())
        same = (
            params is not None
            and len(bound) == len(params)
            and all(
                a is b or (not isinstance(a, torch.Tensor) and type(a) is type(b) and a == b)
                for a, b in zip(bound, params, strict=True)
            )
        )
        if same and callable(compiled.run):  # (.run loads the launcher where it is lazy)
            _keep(key, (compiled, rest))
            return
    except Exception:  # noqa: BLE001, S110  (any surprise: the usual path, always)
        pass
    _refused.add(id(kernel))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel's launcher where the
    call's specialisation was launched before (module doc)."""
    key = None
    if (
        _DIRECT
        and id(kernel) not in _refused
        and hasattr(kernel, "device_caches")
        and _hookless(_KNOBS.runtime.launch_enter_hook)
        and _hookless(_KNOBS.runtime.launch_exit_hook)
    ):
        key = _key(kernel, args, kwargs)
    if key is not None:
        key = (torch._C._cuda_getDevice(), *key)
    hit = _cache.get(key) if key is not None else None
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None:
            _prepare(kernel, key, args, kwargs, compiled)
        return
    compiled, rest = hit
    g = (*grid, 1, 1)
    stream = torch._C._cuda_getCurrentRawStream(key[0])
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None,
                 None, None, *_bound(args, kwargs, rest))  # fmt: skip
