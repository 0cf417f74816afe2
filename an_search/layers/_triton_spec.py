"""What the Triton site (``_triton_site.py``) takes: the checks of a call and its description.

A site qualifies with an inner ``nn.BatchNorm1d/2d/3d`` (affine-free, not Sync, not frozen),
any of the three pools, a head of one or two linear layers (each with a BatchNorm1d,
a GroupNorm(1, width) or no norm, a ReLU between) ending in hard-sigmoid, sigmoid or softmax
over K, K <= 64, batch <= 128, a contiguous or channels-last float32/float16/bfloat16 feature
map, float32 parameters. :func:`site` answers None otherwise, and the module runs its other
paths.

A site's description is kept in the module's ``__dict__`` (:data:`SITE_ATTR`) and built again
when the input's shape, dtype or layout changes, or the module's :class:`~._eval_plan.Structure`
(its submodules, parameters, buffers and the flags the checks read, ``training`` among them)
or a parameter's dtype does: the checks and the head's parse took 16 us of host a call, the
cached answer about 3 us (``bench/site_host.py --noop``), on a host that is the step of eager
AN on a GPU.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from ._eval_plan import _GATES, Structure

__all__ = ["CL_FORMATS", "POOLS", "SITE_ATTR", "Site", "head_params", "pow2", "site"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POOLS = {"meanstd": 0, "avg": 1, "avgmax": 2}  # pool name -> the kernels' POOL code
_MAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_B, _MAX_K = 128, 64  # beyond, the one-program head spills registers to memory
CL_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
_BC_TILE = 2048  # batch x channels of a block of the (B, C) kernels (beyond: registers spill)
SITE_ATTR = "_an_triton_site"  # where a module keeps its last description (not pickled)
_DTYPE = operator.attrgetter("dtype")


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class _Layer:
    """One linear layer of the head and its norm, with the kernels' flags."""

    fc: nn.Linear
    norm: nn.Module | None  # BatchNorm1d or GroupNorm(1, width)
    code: int  # 0 none, 1 batch statistics, 2 running statistics, 3 GroupNorm
    update: bool  # batch statistics with running ones: update them and the counter
    weight: torch.Tensor = field(init=False)  # the linear's
    bias: torch.Tensor | None = field(init=False)
    norm_tensors: list[torch.Tensor | None] = field(init=False)  # see args

    def __post_init__(self) -> None:
        self.weight, self.bias = self.fc.weight, self.fc.bias
        n = self.norm
        if n is None:
            self.norm_tensors = [None] * 5
            return
        running = self.code == 2 or self.update
        self.norm_tensors = [n.weight, n.bias, n.running_mean if running else None,
                             n.running_var if running else None,
                             n.num_batches_tracked if self.update else None]  # fmt: skip

    def args(self, part: torch.Tensor) -> list:
        """Pointers of the norm (weight, bias, running mean/var, counter), ``part`` where none."""
        return [part if t is None else t for t in self.norm_tensors]

    def scalars(self) -> tuple[float, float]:
        """(eps, momentum) of the norm; momentum 0 where there is none (cumulative: a flag)."""
        n = self.norm
        return (n.eps, getattr(n, "momentum", None) or 0.0) if n is not None else (0.0, 0.0)

    def flags(self) -> tuple[bool, int, bool, bool]:
        """BIAS, NORM, UPD, CUM of the head kernel."""
        cum = self.update and self.norm.momentum is None
        return self.fc.bias is not None, self.code, self.update, cum


def _layer(fc: nn.Module, norm: nn.Module | None, b: int) -> _Layer | None:
    if type(fc) is not nn.Linear or fc.weight.dtype != torch.float32:
        return None
    if norm is None:
        return _Layer(fc, None, 0, False)
    if type(norm) is nn.GroupNorm and norm.num_groups == 1 and norm.affine:
        return _Layer(fc, norm, 3, False)
    if type(norm) is not nn.BatchNorm1d or not norm.affine:
        return None
    batch = norm.training or norm.running_mean is None
    if batch and b < 2:
        return None  # BatchNorm1d raises its own error
    return _Layer(fc, norm, 1 if batch else 2, norm.training and norm.running_mean is not None)


def _head(head: nn.Module, b: int) -> tuple[list[_Layer], int] | None:
    """The head's layers and gate code (``_GATES``), or None where it has another form."""
    mods = list(head.children())
    gate = _GATES.get(type(mods[-1])) if mods else None
    if gate is None or (gate == 2 and mods[-1].dim not in (1, -1)):
        return None
    body, layers = mods[:-1], []
    while body:  # Linear [norm] (ReLU Linear [norm])
        fc, body = body[0], body[1:]
        norm = body[0] if body and isinstance(body[0], (nn.BatchNorm1d, nn.GroupNorm)) else None
        body = body[1:] if norm is not None else body
        layer = _layer(fc, norm, b)
        if layer is None:
            return None
        layers.append(layer)
        if body and (len(layers) == 2 or type(body[0]) is not nn.ReLU or len(body) == 1):
            return None  # a ReLU only between two layers
        body = body[1:]
    return (layers, gate) if layers else None


@dataclass
class Site:
    """What one call needs besides the tensors: modules, flags and block sizes."""

    an: nn.Module
    bn: nn.Module  # inner BatchNorm
    layers: list[_Layer]
    gate: int
    use_running: bool  # normalise with the running statistics
    update: bool  # training with running statistics: update them
    blocks: tuple[int, int, int, int]  # BLOCK_B, BLOCK_C, BLOCK_H (layer 1), BLOCK_K
    n: int
    cl: bool  # channels-last memory format: (B, N, C) in memory
    params: list[torch.Tensor | None] = field(init=False)  # Gamma, Beta, *head_params
    updated: list[nn.Module] = field(init=False)  # the BatchNorms the kernels update
    pool_eps: float = field(init=False)
    derived: object = None  # what the launches derive from the rest, once (_triton_site)

    def __post_init__(self) -> None:
        self.params = [self.an.weight, self.an.bias, *head_params(self)]
        heads = [layer.norm for layer in self.layers if layer.update]
        self.updated = [*([self.bn] if self.update else []), *heads]
        self.pool_eps = float(getattr(self.an.attn.pool, "eps", 0.0))

    @property
    def width(self) -> int:
        """Layer 1's width H (K for one layer)."""
        return self.layers[0].fc.out_features


@dataclass
class _Entry:
    """A kept description (None: the kernels do not apply) and what it was built for."""

    shape: torch.Size
    dtype: torch.dtype
    cl: bool | None  # channels-last; False: contiguous; None: neither
    block_c: int | None
    structure: Structure
    watch: tuple[torch.Tensor, ...]  # the parameters the kernels take as float32
    dtypes: list[torch.dtype]  # theirs (``.data`` assignment moves a dtype, not the Structure)
    site: Site | None

    def fits(self, an: nn.Module, x: torch.Tensor, cl: bool | None, block_c: int | None) -> bool:
        return (
            self.shape == x.shape
            and self.dtype == x.dtype
            and self.cl is cl
            and self.block_c == block_c
            and self.structure.matches(an)
            and list(map(_DTYPE, self.watch)) == self.dtypes
        )


def _layout(x: torch.Tensor) -> bool | None:
    """False for a contiguous map, True for a channels-last one, None for any other."""
    if x.is_contiguous():
        return False
    fmt = CL_FORMATS.get(x.dim())
    return True if fmt is not None and x.is_contiguous(memory_format=fmt) else None


def site(an: nn.Module, x: torch.Tensor, block_c: int | None) -> Site | None:
    """The call's description, or None where the kernels do not apply; kept (module doc)."""
    entry = an.__dict__.get(SITE_ATTR)
    cl = _layout(x)
    if entry is not None and entry.fits(an, x, cl, block_c):
        return entry.site
    linears = [m for m in an.attn.head.modules() if type(m) is nn.Linear]
    watch = (an.weight, an.bias, *(m.weight for m in linears))
    s = _build(an, x, cl, block_c)
    an.__dict__[SITE_ATTR] = _Entry(x.shape, x.dtype, cl, block_c, Structure.of(an), watch,
                                    list(map(_DTYPE, watch)), s)  # fmt: skip
    return s


def _build(an: nn.Module, x: torch.Tensor, cl: bool | None, block_c: int | None) -> Site | None:
    bn = an._modules["norm"]
    if type(bn) not in _BN_TYPES or bn.affine or an.pool_name not in POOLS:
        return None
    if x.dtype not in _MAP_DTYPES or x.dim() < 2 or x.numel() == 0 or cl is None:
        return None
    b, c, k = x.shape[0], x.shape[1], an.weight.shape[0]
    n = x.numel() // (b * c)
    if b > _MAX_B or k > _MAX_K or c != an.weight.shape[1]:
        return None
    if an.weight.dtype != torch.float32 or an.bias.dtype != torch.float32:
        return None
    head = _head(an.attn.head, b)
    if head is None:
        return None
    # the norm's own mode: frozen by bn.eval() in a training model, its running stats normalise
    use_running = not bn.training and bn.running_mean is not None
    if not use_running and b * n < 2:
        return None
    update = bn.training and bn.running_mean is not None
    width = head[0][0].fc.out_features
    bb, bh, bk = max(16, pow2(b)), max(16, pow2(width)), max(16, pow2(k))
    bc = block_c or max(16, min(128, _BC_TILE // bb))
    return Site(an, bn, *head, use_running, update, (bb, bc, bh, bk), n, cl)


def head_params(s: Site) -> list[torch.Tensor | None]:
    """Per layer (two slots, the second None for one layer): weight, bias, norm weight, bias."""
    out: list[torch.Tensor | None] = []
    for i in range(2):
        layer = s.layers[i] if i < len(s.layers) else None
        if layer is None:
            out += [None] * 4
            continue
        out += [layer.weight, layer.bias, *layer.norm_tensors[:2]]
    return out
