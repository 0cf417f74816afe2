"""An evaluation-mode AttentiveNorm folded for inference: what ``fuse()`` returns.

``AttentiveNorm`` keeps its folded evaluation form (``_eval_plan.py``, ``_device_eval.py``)
as a cache it checks at every call against the module's parameters, buffers and submodules,
so that training, optimizer steps and edits are never missed. A deployed model does not change,
and the check is not free: with the caches cold, as in a whole model's forward, it took 30-45
us of a 100-150 us site on the CPU. :class:`FoldedAttentiveNorm` is the folded form as a module
of its own, ``AttentiveNorm.fuse()``'s result; ``an_search.fold_sites(model)`` puts one at every
site, and ``timm.utils.reparameterize_model``, which calls ``fuse()`` on every module that has
it, does too (and fuses timm's own reparameterizable blocks)::

    model = an_search.fold_sites(an_model.eval())

Its buffers are :func:`~._eval_plan.fold`'s float64 tensors (the head's linear layers with
their BatchNorm1d folded in, the mixtures with the site's running statistics folded in); it
computes the evaluation-mode function of the AttentiveNorm it came from, in any mode, with the
same CPU kernel (float32/float64 maps on the CPU; other layouts, a slice or a permute, are
made contiguous first, as the site's are) or the same
folded ops (other devices and dtypes, autograd recording through ``x``, graph capture and
tracing). What it derives from the buffers for a dtype is kept and rebuilt when a buffer is
replaced (``.to()``, ``.half()``, ``.cuda()``) or a state dict is loaded; an in-place edit of
a buffer otherwise is not seen until :meth:`FoldedAttentiveNorm.refresh`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._device_eval import _DevicePlan, device_plan, plan_dtype, recording, run_device_plan
from ._eval_plan import _NAMES, _Plan, _spec
from ._fx import fx_leaf, traced_input
from ._native import NATIVE_DTYPES, channels_last_map, library

__all__ = ["FoldedAttentiveNorm"]

_CACHE = "_an_folded"  # in __dict__, left out of the pickled state


@dataclass
class _Derived:
    """What one (dtype, device) takes from the buffers (``buffers``: the tensors it read)."""

    dtype: torch.dtype
    device: torch.device
    buffers: tuple[torch.Tensor, ...]
    ops: _DevicePlan
    kernel: _Plan | None  # the CPU kernel's: float32/float64 maps on the CPU


def check_channels(module: nn.Module, x: torch.Tensor, dim: int) -> None:
    """Refuse an input whose channels (dimension ``dim``) are not the site's ``num_features``,
    as torch's norms do: the CPU kernels take the buffers' sizes on trust (another count read
    and wrote past them); a ``torch.jit.trace`` graph holds ATen ops only, which check it.

    Raises:
        RuntimeError: in the words of torch's convolutions.
    """
    if torch.jit.is_tracing():  # (the size is traced: the graph's own ops check it)
        return
    if x.dim() > 1 and x.shape[dim] != module.num_features:
        raise RuntimeError(
            f"{type(module).__name__} expected input with {module.num_features} channels, but "
            f"got {x.shape[dim]} channels instead (an input of shape {tuple(x.shape)})"
        )


def drop_act(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``module``'s drop and activation (timm's ``*Act`` norms) applied to ``y``; skipped
    where they are ``nn.Identity``."""
    mods = module._modules  # (not module.drop: Module.__getattr__ costs ~2 us a name here)
    drop, act = mods["drop"], mods["act"]
    if not isinstance(drop, nn.Identity):
        y = drop(y)
    return y if isinstance(act, nn.Identity) else act(y)


class FoldedAttentiveNorm(nn.Module):
    """The evaluation-mode function of a batchnorm-based :class:`AttentiveNorm` as folded
    buffers (see the module doc); made by ``AttentiveNorm.fuse()``."""

    def __init__(
        self,
        an: nn.Module,
        dims: tuple[int, ...],
        folded: tuple[list[torch.Tensor], dict[str, int | float]],
    ) -> None:
        """``an``'s folded form, :func:`~._eval_plan.fold`'s answer ``folded``, for inputs of
        ``dims`` dimensions (its BatchNorm's)."""
        super().__init__()
        tensors, self.scalars = folded
        for name, t in zip(_NAMES, tensors, strict=True):
            self.register_buffer(name, t.detach().clone())
        self.num_features, self.k, self.dims = an.num_features, an.k, dims
        #: the parameters of the site it folds (its buffers are derived from them, more
        #: numbers than they: count_cost counts a deployed model's sites by this)
        self.param_count = sum(p.numel() for p in an.parameters())
        self.drop, self.act = an.drop, an.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if traced_input(self, x):
            return fx_leaf(self, x)  # torch.fx.symbolic_trace: one node, as BatchNorm2d is
        if x.dim() not in self.dims:
            raise ValueError(f"expected {' or '.join(map(str, self.dims))}D input (got {x.dim()}D)")
        check_channels(self, x, 1)
        return drop_act(self, self._site(x))

    def _site(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (B, C): one position per channel
            return self._site(x.unsqueeze(-1)).squeeze(-1)
        if _traced(x):  # the ops from the buffers, nothing kept: constants of the graph
            ops = device_plan(None, self._tensors(), self.scalars, plan_dtype(x))
            return run_device_plan(ops, x)
        if x.shape[0] == 0:
            return torch.empty_like(x)
        derived = self._derived(x)
        kernel = derived.kernel
        if kernel is not None and x.dtype == derived.dtype and not recording(x):
            if not x.is_contiguous() and not channels_last_map(x):
                x = x.contiguous()  # (a slice, a permute: the kernel's layout, as the site's)
            return kernel.run(x)
        return run_device_plan(derived.ops, x)

    def _tensors(self) -> list[torch.Tensor]:
        buffers = self._buffers
        return [buffers[name].to(torch.float64) for name in _NAMES]

    def _derived(self, x: torch.Tensor) -> _Derived:
        dtype, cached = plan_dtype(x), self.__dict__.get(_CACHE)
        found = None if cached is None else cached.get(dtype)
        if (
            found is not None
            and found.device == x.device
            and all(map(operator.is_, self._buffers.values(), found.buffers))
        ):
            return found
        with torch.inference_mode(False):  # (kept for later calls: no inference tensors,
            tensors = self._tensors()  # which a call that autograd records could not save)
            kernel = None
            if x.is_cpu and dtype in NATIVE_DTYPES and library() is not None:
                kernel = _Plan(None, *_spec(tensors, self.scalars, dtype))
            found = _Derived(
                dtype, x.device, tuple(self._buffers.values()),
                device_plan(None, tensors, self.scalars, dtype), kernel,
            )  # fmt: skip
        self.__dict__.setdefault(_CACHE, {})[dtype] = found
        return found

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> FoldedAttentiveNorm:
        """``Module._apply`` (``.to()``, ``.cuda()``, ``.float()``, ``.half()``...), but the
        folded buffers keep their float64: each plan casts them for its input's dtype, and a
        cast would round the fold for good (``.float()`` then ``.double()`` would not give it
        back). They follow the device."""
        before = {name: self._buffers[name] for name in _NAMES}
        module = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return module

    def refresh(self) -> None:
        """Drop what was derived from the buffers (after editing one in place)."""
        self.__dict__.pop(_CACHE, None)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.refresh()  # (loading copies into the buffers in place)
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != _CACHE}

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}"


def _traced(x: torch.Tensor) -> bool:
    """Graph capture, tracing or a dispatch mode: plain ops, nothing kept."""
    return (
        type(x) is not torch.Tensor
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or bool(torch._C._len_torch_dispatch_stack())
    )
