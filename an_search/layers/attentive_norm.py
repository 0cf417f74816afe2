"""Attentive Normalization (AN): a norm whose affine transform is an attention-weighted mixture.

Paper: Xilai Li, Wei Sun, Tianfu Wu, "Attentive Normalization", ECCV 2020, arXiv 1908.01259.

    x_hat = norm(x)                                  # affine-free base norm (.norm)
    lam   = head(pool(x))                            # (B, K), from the RAW input x (.attn)
    y     = (lam @ Gamma)[b, c] * x_hat + (lam @ Beta)[b, c]     # Gamma, Beta: (K, C)

AN is a composite that holds its base norm as a child and never subclasses it, so SyncBatchNorm
converters rebuild only the inner norm and keep the mixture (DESIGN.md 5). The K mixtures are
never materialised: the (B, C) scale/shift are computed first and applied in one pass.

Fast path (BatchNorm and GroupNorm bases, DESIGN.md 13): one pass of per-(sample, channel)
moments (on CPU from ``sum(x)`` and ``sum(x^2)``, on CUDA ``var_mean``; see ``_fused.py``) gives
the attention statistic AND the normalisation statistics (batch or group mean/variance, by the
law of total variance); everything is folded into a per-sample scale
``a = gamma * rsqrt(var + eps)`` and shift ``beta - a * mean`` applied by one multiply-add pass.
Running statistics follow ``nn.BatchNorm`` (momentum, momentum None = cumulative average,
unbiased running variance, ``num_batches_tracked``; see ``_norm_stats.py``).
The reference path (``fused = False``, other bases, an inner ``SyncBatchNorm`` whose batch
statistics must be all-reduced across ranks, a single value per channel in training, or eager
training on a GPU, where cuDNN's BatchNorm takes fewer kernel launches than the fused ops and
measured 10-25% faster per site on an H200) calls the inner norm module, then the one-pass
affine.

Eval path (BatchNorm bases on CPU, float32/float64, no autograd): the whole site is one call
of a C kernel (``_native.c``, built on first use, see ``_native.py``; ``_eval_plan.py`` folds
the running statistics into the mixtures and the head's BatchNorm1d into its linear), which
takes each sample's moments, head and multiply-add while the sample is in cache. The training
path uses the same C kernels for the moments, the affine and its backward. Without a C
compiler (or with ``AN_SEARCH_NATIVE=0``) stock ATen ops do the same work, slower. Under
``torch.compile`` the training path is plain ops (inductor fuses them) and the eval path folds
in the graph and calls the kernel as the custom operator ``an_search::eval_site``.

Cost on CPU (bench/an_layer.py, ResNet-50 bn2 shapes, batch 32, 2 threads, 3 runs): an
inference forward takes 0.91-1.11x BatchNorm2d's time at 14x14 and 7x7 and 0.97-1.25x at 28x28
and 56x56, 0.33-0.70x SE's; a train step (forward + backward) 0.66-1.10x BatchNorm2d's up to
14x14 and 1.04-1.33x at 7x7, 0.45-0.85x SE's. In training the (B, C)-level work between the
two feature-map passes is three autograd nodes with C forwards and backwards (``_MeanStd``,
the head's ``Linear`` + ``BatchNorm1d`` in ``_head_train.py``, ``_SiteTail``). On a GPU (H200,
eager) the ~20 small ops of a site are launch-bound: a training step there runs
BatchNorm-based sites as ten Triton kernels, one autograd node, any head, where Triton imports
(``_triton_site.py``; ``AN_SEARCH_TRITON=0`` or ``an.triton = False``: the ops above). Eval
without autograd there is the folded site in eight ops instead of fifteen
(``_device_eval.py``).
Backward runs once, in fused kernels: no double backward (``create_graph=True`` raises, see
``_autograd.py``), and no ``torch.func`` transforms (``fused = False`` too: its pool and
affine are autograd Functions as well).
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from torch import nn

from an_search._modes import eval_mode
from an_search.errors import MAX_K, InvalidKError, UnknownNameError

from ._cpu_site import cpu_site
from ._device_eval import DEVICE_PLAN_ATTR, FOLDED_DEVICES, autocast_off, device_eval
from ._eval_plan import PLAN_ATTR, compiled_eval, eval_plan, fold, records_grad
from ._fused import channel_affine, grad_link, moments, spatial_view
from ._fx import fx_leaf, traced_input
from ._native import NATIVE_DTYPES, channels_last_map, native_available
from ._norm_stats import batch_scale_shift, group_stats, scale_shift, site_tail
from ._triton_site import triton_site, triton_wanted
from ._triton_spec import SITE_ATTR
from .bases import CHANNELS_LAST_BASES, create_base_norm, describe_norm, resolve_base
from .folded import FoldedAttentiveNorm, check_channels, drop_act
from .heads import constant_output, create_head
from .pooling import create_pool

__all__ = ["AttentionWeights", "AttentiveNorm"]

INITS = ("paper", "preserve")
_BN_INPUT_DIMS = {"batchnorm": (4,), "batchnorm1d": (2, 3), "batchnorm3d": (5,)}
_PLAN_ATTRS = (PLAN_ATTR, DEVICE_PLAN_ATTR, SITE_ATTR)  # cached plans and site in __dict__


def _float_mix(
    lam: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixtures in float32 (autocast off: see ``AttentiveNorm._mix``)."""
    lam = lam.float()
    return lam @ weight, lam @ bias


def _zero_initialised(weight: torch.Tensor | None) -> bool:
    """Whether a norm's weight holds zeros only (a meta tensor holds no values: False)."""
    return weight is not None and not weight.is_meta and not weight.detach().any()


class AttentionWeights(nn.Module):
    """Mixture weights of AN: raw input x -> pooled statistic (B, C) -> head -> (B, K)."""

    def __init__(self, channels: int, k: int, head: str, pool: str, channels_last: bool) -> None:
        super().__init__()
        self.pool = create_pool(pool, channels_last)
        self.head = create_head(head, channels, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))  # (B, K)


def _module(layer: nn.Module | type[nn.Module] | None) -> nn.Module:
    if layer is None:
        return nn.Identity()
    return layer if isinstance(layer, nn.Module) else layer()


@register_notrace_module
class AttentiveNorm(nn.Module):
    """Attentive Normalization over one of the base norms of :data:`~.bases.BASES`.

    Args:
        num_features: channels C.
        k: number of mixture components K (>= 1).
        base: base norm name (``batchnorm``, ``groupnorm``, ``layernorm2d``, ``layernorm``, ...).
        head: attention head name (:data:`~.heads.HEADS`).
        pool: pooled statistic name (:data:`~.pooling.POOLS`).
        eps: the base norm's epsilon.
        momentum: BatchNorm running-stat momentum; None = cumulative moving average.
        num_groups: GroupNorm groups.
        layout: ``channels_first`` (B, C, *) or ``channels_last`` (B, *, C); None = the base's.
        act_layer: activation applied after the norm (module or class), e.g. from BatchNormAct2d.
        drop_layer: dropout-like layer applied before the activation (module or class).
        init: ``paper`` (Gamma ~ N(1, 0.1), Beta ~ N(0, 0.1)) or ``preserve`` (at construction
            the layer computes exactly the affine-free base norm, i.e. weight 1, bias 0).
        track_running_stats: BatchNorm bases keep running statistics.
        frozen: BatchNorm base with fixed running statistics (FrozenBatchNorm2d).

    Raises:
        InvalidKError: ``k`` outside 1..MAX_K, or 1 with the ``gn-hsigmoid`` head.
        UnknownNameError: unknown base, head, pool, layout or init.
    """

    fused: bool = True  # set False on an instance to force the reference path
    triton: bool | None = None  # CUDA: Triton kernels (True), not (False), None: triton_wanted

    def __init__(
        self,
        num_features: int,
        k: int,
        base: str = "batchnorm",
        head: str = "default",
        pool: str = "meanstd",
        eps: float | None = 1e-5,
        momentum: float | None = 0.1,
        num_groups: int = 32,
        layout: str | None = None,
        act_layer: nn.Module | type[nn.Module] | None = None,
        drop_layer: nn.Module | type[nn.Module] | None = None,
        init: str = "paper",
        track_running_stats: bool = True,
        frozen: bool = False,
        _source: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= k <= MAX_K:
            raise InvalidKError(
                f"K must be from 1 to {MAX_K}, got {k}; pick a number in that range"
            )
        if k == 1 and head == "gn-hsigmoid":  # (GroupNorm(1, 1) of one logit: always 0)
            raise InvalidKError(
                "the gn-hsigmoid head normalises each sample's K logits together, so with K=1 "
                "its attention is a constant: use K of 2 or more, or another head"
            )
        if init not in INITS:
            raise UnknownNameError(f"unknown init {init!r}; use one of: {', '.join(INITS)}")
        self.base = resolve_base(base, layout)
        self.channels_last = self.base in CHANNELS_LAST_BASES
        self.num_features, self.k = num_features, k
        self.head_name, self.pool_name = head, pool
        self.norm = create_base_norm(
            self.base, num_features, eps, momentum, num_groups, track_running_stats, frozen, _source
        )
        self.attn = AttentionWeights(num_features, k, head, pool, self.channels_last)
        self.weight = nn.Parameter(torch.empty(k, num_features))  # Gamma (K, C)
        self.bias = nn.Parameter(torch.empty(k, num_features))  # Beta (K, C)
        self.drop = _module(drop_layer)
        self.act = _module(act_layer)
        self.reset_parameters()
        if init == "preserve":
            self.init_preserve()

    @property
    def layout(self) -> str:
        """``channels_last`` or ``channels_first``."""
        return "channels_last" if self.channels_last else "channels_first"

    def reset_parameters(self) -> None:
        """Paper init of the mixture: Gamma ~ N(1, 0.1), Beta ~ N(0, 0.1)."""
        nn.init.normal_(self.weight, 1.0, 0.1)
        nn.init.normal_(self.bias, 0.0, 0.1)

    @torch.no_grad()
    def init_preserve(
        self,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        noise: float = 0.1,
    ) -> None:
        """Make the layer compute ``norm(x) * weight + bias`` exactly, in train and eval mode.

        The head's last linear layer is zeroed, so the mixture weights are a constant ``lam0``
        (its gradient is not zero, so the head still learns); train and eval mode agree on
        ``lam0`` while the head's norms hold their initial statistics (a fresh layer). Then
        ``Gamma_k = w / S + e_k``, ``Beta_k = b / S + f_k`` with ``S = sum(lam0)`` and noise
        ``e, f`` (std ``noise * |w| / S``) projected so that ``sum_k lam0_k e_k = 0``: the K
        mixtures differ (their gradients differ) while ``lam0 @ Gamma = w``, ``lam0 @ Beta = b``.

        Args:
            weight: (C,) affine weight of the norm being replaced; None = ones.
            bias: (C,) affine bias; None = zeros.
            noise: relative size of the symmetry-breaking noise.
        """
        last = self.attn.head.last_linear()
        last.weight.zero_()
        lam0 = constant_output(self.attn.head, self.num_features).to(self.weight.dtype)  # (K,)
        s = lam0.sum()
        w = torch.ones_like(self.weight[0]) if weight is None else weight.detach().to(self.weight)
        b = torch.zeros_like(self.bias[0]) if bias is None else bias.detach().to(self.bias)
        scale = noise * w.abs() / s  # (C,)
        mix = []
        for target in (w, b):
            e = torch.randn_like(self.weight) * scale  # (K, C)
            e -= lam0[:, None] * (lam0 @ e)[None, :] / (lam0 @ lam0)  # lam0 @ e == 0
            mix.append(target[None, :] / s + e)
        self.weight.copy_(mix[0])
        self.bias.copy_(mix[1])

    @classmethod
    def from_norm(
        cls,
        norm: nn.Module,
        k: int,
        head: str = "default",
        pool: str = "meanstd",
        init: str = "paper",
    ) -> AttentiveNorm:
        """Build the AN that replaces ``norm`` (any class of :func:`~.bases.is_supported_norm`).

        Copies eps, momentum, groups, running statistics, device/dtype and train/eval mode, and
        keeps the drop + activation of timm's ``*Act`` norms. ``init="preserve"`` makes the new
        layer compute exactly ``norm``'s function (train and eval) at construction. Under
        ``init="paper"`` a ``norm`` whose weight is all zero (timm's ``zero_init_last``: the
        last norm of a residual block) gets Gamma = Beta = 0, so that its branch still starts
        at zero, as in the reference's zero-initialised last BN.

        Raises:
            UnknownNameError: unsupported norm class, or unknown head/pool/init.
            InvalidKError: ``k < 1``.
        """
        spec = describe_norm(norm)
        an = cls(
            spec.channels,
            k,
            base=spec.base,
            head=head,
            pool=pool,
            eps=spec.eps,
            momentum=spec.momentum,
            num_groups=spec.num_groups,
            act_layer=spec.act,
            drop_layer=spec.drop,
            init="paper" if init == "preserve" else init,
            track_running_stats=spec.track_running_stats,
            frozen=spec.frozen,
            _source=type(norm),
        )
        tensors = [*norm.parameters(recurse=False), *norm.buffers(recurse=False)]
        ref = next((t for t in tensors if t.is_floating_point()), None)
        if ref is not None:
            an.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(norm, name, None), getattr(an.norm, name, None)
                if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                    dst.copy_(src)
        if init == "preserve":
            an.init_preserve(spec.weight, spec.bias)
        elif _zero_initialised(spec.weight):
            # a zero-initialised norm (timm's zero_init_last, the reference's last BN of a
            # residual block): the branch must start at zero, not at an effective scale of K/2
            with torch.no_grad():
                an.weight.zero_()
                an.bias.zero_()
        return an.train(norm.training)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights lambda (B, K) that this site gives ``x``: its head on the
        pooled statistic, as in evaluation (the head's running statistics; nothing is
        updated), through the pool and head modules (their hooks fire, as they may not in a
        forward, which runs fused). In evaluation the site's output is ``norm(x) *
        (lambda @ weight) + lambda @ bias`` per channel."""
        with eval_mode(self.attn):
            return self.attn.head(self.attn.pool(x))

    def fuse(self) -> nn.Module:
        """This site's evaluation-mode function as a :class:`~.folded.FoldedAttentiveNorm`:
        folded buffers, no per-call checks, for inference (``timm.utils.reparameterize_model``
        calls it); ``self`` where the site has no folded form (bases other than BatchNorm,
        the ``avgmax`` pool, heads beyond two linear layers, no running statistics). A
        training-mode site folds its evaluation too (its head's BatchNorm by its running
        statistics), as ``fold_sites`` of a model not put in ``eval()`` does."""
        dims = _BN_INPUT_DIMS.get(self.base)
        if dims is None:
            return self
        with eval_mode(self):  # (each module's own mode put back after)
            folded = fold(self)
        return self if folded is None else FoldedAttentiveNorm(self, dims, folded)

    def train(self, mode: bool = True) -> AttentiveNorm:
        """:meth:`torch.nn.Module.train`; a change of mode also drops the folded eval plans
        (:meth:`refresh`), so that weights edited through ``.data`` while training are folded
        afresh at the next evaluation."""
        if mode != self.training:
            self.refresh()
        return super().train(mode)

    def refresh(self) -> None:
        """Drop the cached folded eval plans (CPU and GPU) and the Triton site's description;
        the next eval call folds again.

        A plan is refolded by itself when a parameter, buffer, submodule or folded attribute
        changes through the usual means (in-place ops, ``copy_``, ``load_state_dict``, an
        optimizer step, assignment): their version counters and identities are checked every
        call. Edits through ``.data`` move no version counter: after such edits in eval mode,
        call ``refresh()`` (a ``train()`` / ``eval()`` round trip does too)."""
        for attr in _PLAN_ATTRS:
            self.__dict__.pop(attr, None)

    def __getstate__(self) -> dict:
        """The pickled (and deep-copied) state, without the cached plans (ctypes) and site."""
        return {k: v for k, v in self.__dict__.items() if k not in _PLAN_ATTRS}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if traced_input(self, x):
            return fx_leaf(self, x)  # torch.fx.symbolic_trace: one node, as BatchNorm2d is
        check_channels(self, x, -1 if self.channels_last else 1)  # (the C kernels trust it)
        if not torch.jit.is_tracing() and not x.numel():  # nothing to attend to: the inner
            # norm's answer, or its error (a trace would bake the branch in: left out)
            return drop_act(self, self._modules["norm"](x))
        y = self._forward_triton(x) if x.is_cuda else None
        if y is None and not self.training:
            y = self._forward_native_eval(x)
        if y is None:
            y = self._forward_fused(x) if self._can_fuse(x) else self._forward_reference(x)
        return drop_act(self, y)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        if not self.fused:
            return False  # (compiled or off the CPU: the same algorithm in plain ops, _fused.py)
        if self.training and x.device.type != "cpu" and not torch.compiler.is_compiling():
            return False  # eager GPU training: cuDNN's one-kernel BatchNorm, fewer launches
        if self.base not in ("batchnorm", "batchnorm1d", "batchnorm3d"):
            return self.base == "groupnorm"
        if isinstance(self.norm, nn.SyncBatchNorm):
            return False  # batch statistics must be all-reduced: let SyncBatchNorm do it
        if self._modules["norm"].training and x.numel() // x.shape[1] <= 1:
            return False  # the inner BatchNorm raises its usual error
        return True

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor | None:
        """The site as Triton kernels (``_triton_site.py``), eager only; None if n/a or off."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None  # (first: Dynamo breaks its graph on triton_wanted's cached query)
        if not triton_wanted(self.triton, self.training, x.device):
            return None
        if not self.fused or type(x) is not torch.Tensor:
            return None
        return None if torch._C._len_torch_dispatch_stack() else triton_site(self, x)

    def _forward_native_eval(self, x: torch.Tensor) -> torch.Tensor | None:
        """Eval-mode BatchNorm-based AN as one native call on the CPU (``_eval_plan.py``), as
        the folded site in eight ops on a GPU (``_device_eval.py``); None if n/a.

        At 7x7 the Python around the kernel is a fifth of the site's time, and it runs with
        the caches just flushed by the previous layer's feature maps: the checks are ordered
        and written for that (member dicts read directly, no ``parameters()`` walk unless
        autograd is recording)."""
        dims = _BN_INPUT_DIMS.get(self.base)
        if dims is None or not self.fused or self._modules["norm"].training:
            return None
        if torch.compiler.is_compiling():  # an opaque operator in the graph
            return self._compiled_native_eval(x, dims)
        if type(x) is not torch.Tensor or torch.jit.is_tracing():
            return None
        if x.device.type in FOLDED_DEVICES:  # a GPU: the folded site in few launches
            return device_eval(self, x) if x.dim() in dims else None
        if (
            torch._C._len_torch_dispatch_stack()  # FlopCounterMode etc. must see the ops
            or not x.is_cpu
            or not self._native_eval_input(x, dims)
        ):
            return None
        plan = eval_plan(self, x.dtype)  # None also without the C kernels
        if plan is None:
            return None
        if not x.is_contiguous() and not channels_last_map(x):
            x = x.contiguous()  # (a slice, a permute: as the folded site, the kernel's layout)
        return plan.run(x)

    def _compiled_native_eval(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor | None:
        """Under torch.compile: the folded site as ``an_search::eval_site`` (contiguous maps);
        None if n/a."""
        if x.device.type != "cpu" or not x.is_contiguous() or not self._native_eval_input(x, dims):
            return None
        return compiled_eval(self, x) if native_available() else None

    def _native_eval_input(self, x: torch.Tensor, dims: tuple[int, ...]) -> bool:
        """The checks of a CPU ``x`` shared by the eager and compiled native eval: dtype, rank,
        not empty, and no autograd recording (the layout: each its own)."""
        if x.dtype not in NATIVE_DTYPES or x.dim() not in dims:
            return False
        if x.numel() == 0:
            return False
        return not records_grad(self, x)

    def _mixture(self, stat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mix(self.attn.head(stat))  # head: (B, K)

    def _mix(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.weight, self.bias
        dev = lam.device.type
        if dev != "meta" and torch.is_autocast_enabled(dev) and weight.dtype == torch.float32:
            # (autocast would mix in bfloat16/half: the K rows of a ``preserve`` init differ by
            # noise that cancels in the mixture, leaving 2^-8 of it there; as on a GPU
            # (_device_eval.py) the mixtures run in float32, autocast off)
            return autocast_off(dev, _float_mix, lam, weight, bias)
        if weight.dtype != lam.dtype:
            weight, bias = weight.to(lam.dtype), bias.to(lam.dtype)
        return lam @ weight, lam @ bias  # gamma, beta: (B, C) each

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self._mixture(self.attn.pool(x))  # (B, C) each
        x_hat = self.norm(x)
        if self.channels_last:  # (B, *, C)
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
            return torch.addcmul(beta.view(shape), x_hat, gamma.view(shape)).to(x.dtype)
        return channel_affine(x_hat, gamma, beta)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        dims = _BN_INPUT_DIMS.get(self.base)
        if dims is not None and x.dim() not in dims:  # as the inner BatchNorm would
            raise ValueError(f"expected {' or '.join(map(str, dims))}D input (got {x.dim()}D)")
        y = cpu_site(self, x)  # training: the whole site as one autograd node (_cpu_site.py)
        if y is not None:
            return y
        x3 = spatial_view(x, False)  # (B, C, n)
        link = grad_link(x)
        m, v = moments(x3, link=link)  # (B, C) per-sample mean and biased variance
        lam = self.attn.head(self.attn.pool.from_moments(m, v, x3))  # (B, K)
        if self.base == "groupnorm":
            mean, var = group_stats(m, v, self.norm.num_groups)  # (B, C) each
            scale, shift = scale_shift(*self._mix(lam), mean, var, self.norm.eps)
            return channel_affine(x, scale, shift, link)
        # the inner BatchNorm's own mode, as the reference path calls it: it may be frozen
        # (``norm.eval()``) inside a training model, then its running statistics normalise
        n, training = x3.shape[2], self._modules["norm"].training
        tail = site_tail(self.norm, m, v, lam, self.weight, self.bias, n, training)  # one node
        if tail is None:
            tail = batch_scale_shift(self.norm, m, v, *self._mix(lam), n, training)
        return channel_affine(x, *tail, link)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, k={self.k}, base={self.base}, head={self.head_name}, "
            f"pool={self.pool_name}"
        )
