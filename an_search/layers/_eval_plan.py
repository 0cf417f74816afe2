"""Evaluation-mode AttentiveNorm(BatchNorm) as one native call per site (see ``_native.c``).

In evaluation every sample is independent: its moments give the pooled statistic, the head
gives lambda, and ``y = x * (lambda @ A) + lambda @ T`` with the running statistics folded
into the mixtures (``A = Gamma / sqrt(rv + eps)``, ``T = Beta - A * rm``) and the head's
BatchNorm1d folded into its linears. The native kernel does all of it sample by sample while
the sample is in cache: one read from memory, one write, as BatchNorm's own evaluation.
Channels-last maps (memory (B, *, C): 4d/5d memory formats, a transposed 3d map) take the
same plan through ``_native_cl.c``'s kernel (eager only: under ``torch.compile`` the operator
takes contiguous maps).

The folded parameters (float64; the packed mixtures in the input's dtype) are cached per module
and dtype and rebuilt when any parameter or buffer changes (version counter or storage), after
any optimizer step (fused optimizers move no version counter), or when a submodule, parameter
or buffer it holds is replaced or removed, or one is added beside them. That check reads the
module's own dicts (a few microseconds): walking ``parameters()`` and ``buffers()`` cost more
than the kernel itself at 7x7. Under ``torch.compile`` the folding and the packing are traced
into the graph and the kernel is the custom operator ``an_search::eval_site``.
"""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import TypeVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._native import HeadSpec, library

__all__ = [
    "PLAN_ATTR",
    "Structure",
    "cached_plan",
    "compiled_eval",
    "eval_plan",
    "eval_site",
    "fold",
    "kernel_tensors",
    "records_grad",
    "run_eval_plan",
]

_GATES = {nn.Hardsigmoid: 0, nn.Sigmoid: 1, nn.Softmax: 2}
_POOLS = {"meanstd": 0, "avg": 1}


@dataclass
class _Plan:
    """A folded site for inputs of one dtype (``spec`` None: the site has no native form);
    ``key`` None: kept by its owner's own rule (the folded module, :mod:`.folded`)."""

    key: _Key | None
    spec: HeadSpec | None
    tensors: list[torch.Tensor] = field(default_factory=list)  # keeps the pointers alive
    ref: object = None  # ctypes.byref(spec), made once
    fn: Callable[..., int] | None = None  # an_eval_f32 or an_eval_f64
    fn_cl: Callable[..., int] | None = None  # an_eval_cl_f32 or an_eval_cl_f64

    def __post_init__(self) -> None:
        if self.spec is not None:
            dtype = self.tensors[-1].dtype  # the packed mixtures: in the kernel's dtype
            self.ref, self.fn = ctypes.byref(self.spec), _kernel(dtype)
            self.fn_cl = _kernel(dtype, "an_eval_cl")

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The site over a CPU (B, C, *) ``x`` of the plan's dtype, contiguous or channels-last
        (memory (B, *, C); the output keeps the layout)."""
        return _run(self.fn if x.is_contiguous() else self.fn_cl, self.ref, x)


@dataclass
class Structure:
    """What a module's folded or parsed form is built from besides its tensors' values: the
    submodules' non-empty member dicts with their values (held, so that ``is`` cannot be fooled
    by a reused id), and the plain attributes the builders read (:data:`_SCALARS`, e.g. a
    norm's ``eps``). Empty dicts are left out: what the builders read is in the others (an
    absent bias is a ``None`` entry). :meth:`matches` runs once per call: its loops are ``map``
    over C callables (about 2 us for a default site). It also asks that the module be the one
    it was built from (its ``__dict__``): a copy of a module's ``__dict__`` (``nn.DataParallel``'s
    replicas) holds the kept plans while its parameters and submodules are the replica's own."""

    owner: dict  # the module's __dict__
    dicts: tuple[dict, ...]
    lens: list[int]
    values: tuple[object, ...]
    attr_dicts: tuple[dict, ...]  # the modules' __dict__s holding the scalars
    attr_names: tuple[str, ...]
    attr_values: list[object]

    @classmethod
    def of(cls, an: nn.Module) -> Structure:
        dicts = tuple(d for m in an.modules() for d in (m._parameters, m._buffers, m._modules)
                      if d)  # fmt: skip
        values = tuple(chain.from_iterable(map(dict.values, dicts)))
        watched = [(m.__dict__, name) for m in an.modules() for name in _SCALARS
                   if name in m.__dict__]  # fmt: skip
        attr_dicts, attr_names = tuple(d for d, _ in watched), tuple(n for _, n in watched)
        attr_values = list(map(dict.get, attr_dicts, attr_names))
        return cls(an.__dict__, dicts, list(map(len, dicts)), values, attr_dicts, attr_names,
                   attr_values)  # fmt: skip

    def matches(self, an: nn.Module) -> bool:
        return (
            an.__dict__ is self.owner
            and list(map(dict.get, self.attr_dicts, self.attr_names)) == self.attr_values
            and list(map(len, self.dicts)) == self.lens  # then the zip below is exact
            and all(
                map(operator.is_, chain.from_iterable(map(dict.values, self.dicts)), self.values)
            )  # fmt: skip
        )


_STEPS = [0]  # optimizer steps taken in this process (see _Key)


def _count_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


@dataclass
class _Key:
    """What a plan was folded from: the dtype, the module's :class:`Structure`, each tensor's
    version and data pointer (in-place updates and ``.data`` assignment), and the count of
    optimizer steps taken in the process: fused optimizers (``Adam(fused=True)``...) update
    parameters in place without moving their version counters, so any step refolds (a model
    kept in eval mode while another trains folds once per step). In-place
    edits through ``.data`` move no version counter and are not seen:
    ``AttentiveNorm.refresh()`` (or a change of mode) drops the plan. Inference tensors (a
    module built or loaded under ``torch.inference_mode``) have no version counter, and
    in-place edits in inference mode would go unseen: ``versions`` is None and the key never
    matches (the site folds at every call)."""

    dtype: torch.dtype
    structure: Structure
    tensors: tuple[torch.Tensor, ...]
    versions: list[int] | None
    ptrs: list[int]
    steps: int

    @classmethod
    def of(cls, an: nn.Module, dtype: torch.dtype) -> _Key:
        structure = Structure.of(an)
        tensors = tuple(t for t in structure.values if isinstance(t, torch.Tensor))
        if any(map(torch.Tensor.is_inference, tensors)):
            return cls(dtype, structure, tensors, None, [], _STEPS[0])
        versions, ptrs = list(map(_VERSION, tensors)), list(map(_PTR, tensors))
        return cls(dtype, structure, tensors, versions, ptrs, _STEPS[0])

    def matches(self, an: nn.Module, dtype: torch.dtype) -> bool:
        return (
            self.versions is not None
            and self.steps == _STEPS[0]
            and dtype == self.dtype
            and self.structure.matches(an)
            and list(map(_VERSION, self.tensors)) == self.versions
            and list(map(_PTR, self.tensors)) == self.ptrs
        )


# Plain attributes that fold() reads (eps of the norms and the pool, the head norms' mode and
# affinity, GroupNorm's groups, softmax's dim, the pool's name): a change refolds.
_SCALARS = ("eps", "training", "affine", "num_groups", "dim", "pool_name")
_VERSION = operator.attrgetter("_version")
_PTR = torch.Tensor.data_ptr
_P = TypeVar("_P")  # a plan type (with a ``key``)
PLAN_ATTR = "_an_eval_plan"  # where a module keeps its plan (left out of its pickled state)


def _kernel(dtype: torch.dtype, name: str = "an_eval") -> Callable[..., int] | None:
    """``name``_f32 or ``name``_f64 for inputs of ``dtype``; None without the library."""
    lib = library()
    if lib is None:
        return None
    return getattr(lib, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).contiguous()


def _fold_linear(
    lin: nn.Linear, norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(W, s, b) with ``norm(lin(h)) == (W @ h) * s + b`` for an eval BatchNorm1d or no norm."""
    w = _f64(lin.weight)
    bias = _f64(lin.bias) if lin.bias is not None else w.new_zeros(w.shape[0])
    if norm is None:
        return w, torch.ones_like(bias), bias
    if not isinstance(norm, nn.BatchNorm1d) or norm.running_mean is None or norm.training:
        return None
    s = torch.rsqrt(_f64(norm.running_var) + norm.eps)
    shift = -_f64(norm.running_mean) * s
    if norm.affine:
        s, shift = s * _f64(norm.weight), shift * _f64(norm.weight) + _f64(norm.bias)
    return w, s, bias * s + shift


def _parse_head(head: nn.Module) -> dict | None:
    """Split a head Sequential into folded layers, GroupNorm and gate; None if unsupported."""
    mods = list(head.children())
    gate = _GATES.get(type(mods[-1])) if mods else None
    if gate is None or (gate == 2 and getattr(mods[-1], "dim", 1) not in (1, -1)):
        return None
    layers, gn, i = [], None, 0
    body = mods[:-1]
    while i < len(body):
        lin = body[i]
        if not isinstance(lin, nn.Linear):
            return None
        nxt = body[i + 1] if i + 1 < len(body) else None
        norm = nxt if isinstance(nxt, nn.BatchNorm1d) else None
        if isinstance(nxt, nn.GroupNorm) and nxt.num_groups == 1 and i + 2 == len(body):
            gn = nxt
        folded = _fold_linear(lin, norm)
        if folded is None:
            return None
        layers.append(folded)
        i += 2 if norm is not None or gn is not None else 1
        if i < len(body) and isinstance(body[i], nn.ReLU):
            if len(layers) != 1:
                return None
            i += 1
        elif len(layers) == 1 and i < len(body):
            return None  # two linears need a ReLU between them
    if not 1 <= len(layers) <= 2:
        return None
    return {"layers": layers, "gn": gn, "gate": gate}


_NAMES = ("w1", "s1", "b1", "w2", "s2", "b2", "gn_w", "gn_b", "mix_a", "mix_t")
_KERNEL_DTYPE = ("w1", "w2")  # kept in the input's dtype (the others: float64)
_MIX_BLOCK = 16  # channels per block of the packed mixtures (MIX_BLOCK in _native.c)


def fold(an: nn.Module) -> tuple[list[torch.Tensor], dict[str, int | float]] | None:
    """The folded float64 tensors (in :data:`_NAMES` order) and scalars of ``an``'s eval
    site, from plain torch ops (traceable by torch.compile); None where unsupported."""
    if any(m._forward_pre_hooks for m in an.modules() if m is not an):
        return None  # (torch.nn.utils.prune's: the weights are made by calling the module)
    pool = _POOLS.get(an.pool_name)
    parsed = _parse_head(an.attn.head)
    norm = an.norm
    if pool is None or parsed is None or getattr(norm, "running_mean", None) is None:
        return None
    inv = torch.rsqrt(_f64(norm.running_var) + norm.eps)  # (C,)
    mix_a = _f64(an.weight) * inv
    mix_t = _f64(an.bias) - mix_a * _f64(norm.running_mean)  # contiguous, as mix_a
    layers = parsed["layers"]
    w1, s1, b1 = layers[0]
    w2, s2, b2 = layers[-1]
    gn = parsed["gn"]
    gn_w = _f64(gn.weight) if gn is not None and gn.affine else torch.ones_like(b2)
    gn_b = _f64(gn.bias) if gn is not None and gn.affine else torch.zeros_like(b2)
    scalars: dict[str, int | float] = {
        "pool": pool,
        "pool_eps": float(getattr(an.attn.pool, "eps", 0.0)),
        "layers": len(layers),
        "gn": int(gn is not None),
        "gn_eps": float(gn.eps) if gn is not None else 0.0,
        "gate": parsed["gate"],
    }
    return [w1, s1, b1, w2, s2, b2, gn_w, gn_b, mix_a, mix_t], scalars


def _pack_mixtures(mix_a: torch.Tensor, mix_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K, C) scale and shift mixtures as (ceil(C / 16), K, 2, 16) in the kernel's dtype,
    zero-padded: the kernel reads each block of 16 channels as one contiguous run. Plain
    functional ops (torch.compile traces them into the graph)."""
    k, c = mix_a.shape
    blocks = -(-c // _MIX_BLOCK)
    both = torch.nn.functional.pad(torch.stack([mix_a, mix_t], 1), (0, blocks * _MIX_BLOCK - c))
    return both.to(dtype).view(k, 2, blocks, _MIX_BLOCK).permute(2, 0, 1, 3).contiguous()


def kernel_tensors(folded: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The tensors the kernel reads for inputs of ``dtype``, from :func:`fold`'s: the linear
    weights in ``dtype``, the other head tensors in float64, then the packed mixtures (the
    names of :data:`_NAMES` but the mixtures, then ``mix``). Plain ops, traceable."""
    alive = [t.to(dtype).contiguous() if name in _KERNEL_DTYPE else t.contiguous()
             for name, t in zip(_NAMES[:-2], folded[:-2], strict=True)]  # fmt: skip
    return [*alive, _pack_mixtures(folded[-2], folded[-1], dtype)]


def _head_spec(tensors: list[torch.Tensor], scalars: dict[str, int | float]) -> HeadSpec:
    """The kernel's head description pointing into :func:`kernel_tensors`' tensors (which must
    outlive its use)."""
    spec = HeadSpec(**scalars, hidden=tensors[0].shape[0], k=tensors[3].shape[0])
    for name, t in zip((*_NAMES[:-2], "mix"), tensors, strict=True):
        setattr(spec, name, t.data_ptr())
    return spec


def _spec(
    tensors: list[torch.Tensor], scalars: dict[str, int | float], dtype: torch.dtype
) -> tuple[HeadSpec, list[torch.Tensor]]:
    """The kernel's head description for inputs of ``dtype``, and the tensors its pointers
    point into."""
    alive = kernel_tensors(tensors, dtype)
    return _head_spec(alive, scalars), alive


def _build(an: nn.Module, dtype: torch.dtype) -> _Plan:
    key = _Key.of(an, dtype)  # before folding: a change while folding shows at the next call
    folded = fold(an) if library() is not None else None
    return _Plan(key, None) if folded is None else _Plan(key, *_spec(*folded, dtype))


def eval_plan(an: nn.Module, dtype: torch.dtype) -> _Plan | None:
    """The folded plan of ``an`` (an eval-mode batchnorm-based AttentiveNorm) for ``dtype``
    inputs, cached in the module's ``__dict__``; None where the site has no native form (that
    answer is cached too, under the same key)."""
    plan = cached_plan(an, PLAN_ATTR, dtype, _build)
    return None if plan.fn is None else plan


def cached_plan(
    an: nn.Module, attr: str, dtype: torch.dtype, build: Callable[[nn.Module, torch.dtype], _P]
) -> _P:
    """``build(an, dtype)``, kept in ``an.__dict__[attr]`` and rebuilt when its ``key`` (a
    :class:`_Key`) no longer matches: the one cache of the CPU plan and the GPU one."""
    plan = an.__dict__.get(attr)
    if plan is None or not plan.key.matches(an, dtype):
        plan = an.__dict__[attr] = build(an, dtype)
    return plan


def records_grad(an: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd records through the site: the plans' folded tensors are detached."""
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in an.parameters())
    )


def _run(fn: Callable[..., int], spec: object, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (an_eval_[cl_]f32/f64) over a CPU (B, C, *) ``x`` of its dtype in ``fn``'s layout,
    into a new tensor of ``x``'s strides; ``spec`` is ``ctypes.byref`` of a :class:`HeadSpec`."""
    shape = x.shape
    b, c = shape[0], shape[1]
    y = torch.empty_like(x)
    if fn(spec, x.data_ptr(), y.data_ptr(), b, c, x.numel() // (b * c), torch.get_num_threads()):
        raise MemoryError("AttentiveNorm eval kernel: no memory for its workspace")
    return y


def run_eval_plan(plan: _Plan, x: torch.Tensor) -> torch.Tensor:
    """Apply the plan to a contiguous CPU float32/float64 (B, C, *) tensor."""
    return plan.run(x)


@torch.library.custom_op("an_search::eval_site", mutates_args=(), device_types="cpu")
def eval_site(
    x: torch.Tensor,
    w1: torch.Tensor,
    s1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    b2: torch.Tensor,
    gn_w: torch.Tensor,
    gn_b: torch.Tensor,
    mix: torch.Tensor,
    pool: int,
    pool_eps: float,
    layers: int,
    gn: int,
    gn_eps: float,
    gate: int,
) -> torch.Tensor:
    """The eval kernel as a torch operator, so that ``torch.compile``d graphs call it: the
    tensors of :func:`kernel_tensors` (folded and packed in the graph), the scalars of
    :func:`fold`. Only pointers are taken here: with the packing done in here, each call added
    about 70 us to the kernel's time at 64x8 (batch 32), now about 25 us."""
    tensors = [t.contiguous() for t in (w1, s1, b1, w2, s2, b2, gn_w, gn_b, mix)]
    scalars = {"pool": pool, "pool_eps": pool_eps, "layers": layers, "gn": gn,
               "gn_eps": gn_eps, "gate": gate}  # fmt: skip
    spec = _head_spec(tensors, scalars)
    y = _run(_kernel(x.dtype), ctypes.byref(spec), x.contiguous())
    del tensors  # the kernel has read them
    return y


@eval_site.register_fake
def _(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def compiled_eval(an: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Under torch.compile: fold in the graph, then call :func:`eval_site`; None if n/a."""
    folded = fold(an)
    if folded is None:
        return None
    return eval_site(x, *kernel_tensors(folded[0], x.dtype), **folded[1])
