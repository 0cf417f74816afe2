"""Attention heads of Attentive Normalization: pooled statistic (B, C) -> mixture weights (B, K).

Paper: Li, Sun, Wu, "Attentive Normalization", ECCV 2020, arXiv 1908.01259 (see AN_PAPER.md,
"attention-head configuration"). One class per variant, registered by name in :data:`HEADS`:

========================  ==================================================================
name                      head
========================  ==================================================================
``default``               Linear C->K (no bias) -> BatchNorm1d(K) -> hard-sigmoid
``linear-sigmoid``        Linear C->K (bias) -> sigmoid
``linear-hsigmoid``       Linear C->K (bias) -> hard-sigmoid
``bn-sigmoid``            Linear C->K (no bias) -> BatchNorm1d(K) -> sigmoid
``bn-softmax``            Linear C->K (no bias) -> BatchNorm1d(K) -> softmax over K
``gn-hsigmoid``           Linear C->K (no bias) -> GroupNorm(1, K) -> hard-sigmoid
``mlp``                   Linear C->2K (bias) -> ReLU -> Linear 2K->K (bias) -> sigmoid
``mlp-bn``                Linear C->2K -> BN -> ReLU -> Linear 2K->K -> BN -> hard-sigmoid
========================  ==================================================================

hard-sigmoid is ``relu6(z + 3) / 6`` (``nn.Hardsigmoid``); only ``bn-softmax`` sums to 1.
Paper init: linear weights Kaiming-normal (fan_out, relu), biases 0, norm weight 1 / bias 0.
"""

from __future__ import annotations

import torch
from torch import nn

from an_search.errors import UnknownNameError

from ._head_train import linear_batchnorm

__all__ = [
    "HEADS",
    "BnSigmoidHead",
    "BnSoftmaxHead",
    "DefaultHead",
    "GnHSigmoidHead",
    "LinearHSigmoidHead",
    "LinearSigmoidHead",
    "MlpBnHead",
    "MlpHead",
    "create_head",
    "head_param_count",
]


def _norm(kind: str, features: int) -> nn.Module:
    return nn.BatchNorm1d(features) if kind == "bn" else nn.GroupNorm(1, features)


def _gate(kind: str) -> nn.Module:
    return {"hsigmoid": nn.Hardsigmoid(), "sigmoid": nn.Sigmoid(), "softmax": nn.Softmax(dim=1)}[
        kind
    ]


class _Head(nn.Sequential):
    """Base of every head: a Sequential whose last ``nn.Linear`` produces the K logits. Its
    input, the pooled statistic, is computed in float32 from float16/bfloat16 maps; outside
    autocast it is cast to the head's own dtype (a model converted with ``.half()`` or
    ``.to(torch.bfloat16)`` runs its heads in that dtype, as its other layers)."""

    _norm_kind: str | None = None  # "bn": BatchNorm1d over the batch; "gn": GroupNorm(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self._as_input(x))

    def _as_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            self._check_batch()
        dtype = next(iter(self._modules.values())).weight.dtype  # (its first nn.Linear)
        if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(dtype)

    def _check_batch(self) -> None:
        """A batch of one sample in training: the heads with a BatchNorm1d (in training mode)
        normalise their logits over the batch, which BatchNorm1d refuses with a message about
        a (1, K) input the user never made; say what it is and what to do."""
        if any(type(m) is nn.BatchNorm1d and m.training for m in self.children()):
            name = next((n for n, c in HEADS.items() if c is type(self)), type(self).__name__)
            free = ", ".join(n for n, c in HEADS.items() if c._norm_kind != "bn")
            raise ValueError(
                f"AttentiveNorm's {name!r} head normalises its logits over the batch "
                f"(BatchNorm1d), so a training batch needs at least 2 samples, got 1: train "
                f"with batches of 2 or more, or use a head without it ({free})"
            )

    def reset_parameters(self) -> None:
        """Paper init: Kaiming-normal (fan_out, relu) linears, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def last_linear(self) -> nn.Linear:
        """The linear layer that produces the K logits."""
        return [m for m in self if isinstance(m, nn.Linear)][-1]


class _LinearHead(_Head):
    _use_bias: bool = False
    _norm_kind: str | None = None
    _gate_kind: str = "hsigmoid"

    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, k, bias=self._use_bias)  # (B, C) -> (B, K)
        if self._norm_kind:
            self.norm = _norm(self._norm_kind, k)
        self.gate = _gate(self._gate_kind)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, norm = self._as_input(x), self._modules.get("norm")
        z = None if norm is None or not norm.training else linear_batchnorm(self.fc, norm, x)
        return nn.Sequential.forward(self, x) if z is None else self.gate(z)  # _head_train.py

    @classmethod
    def param_count(cls, channels: int, k: int) -> int:
        """Learnable parameters: K*C weights, K biases, 2K norm affine."""
        return k * channels + (k if cls._use_bias else 0) + (2 * k if cls._norm_kind else 0)


class _MlpHead(_Head):
    _use_bias: bool = True
    _norm_kind: str | None = None
    _gate_kind: str = "sigmoid"

    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, 2 * k, bias=self._use_bias)  # (B, C) -> (B, 2K)
        if self._norm_kind:
            self.norm1 = _norm(self._norm_kind, 2 * k)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * k, k, bias=self._use_bias)  # (B, 2K) -> (B, K)
        if self._norm_kind:
            self.norm2 = _norm(self._norm_kind, k)
        self.gate = _gate(self._gate_kind)
        self.reset_parameters()

    @classmethod
    def param_count(cls, channels: int, k: int) -> int:
        """Learnable parameters of both linears, their biases and norms."""
        weights = 2 * k * channels + 2 * k * k
        biases = 3 * k if cls._use_bias else 0
        norms = 6 * k if cls._norm_kind else 0
        return weights + biases + norms


class DefaultHead(_LinearHead):
    """Paper default: Linear (no bias) -> BatchNorm1d(K) -> hard-sigmoid."""

    _norm_kind = "bn"


class LinearSigmoidHead(_LinearHead):
    """Linear (bias) -> sigmoid."""

    _use_bias, _gate_kind = True, "sigmoid"


class LinearHSigmoidHead(_LinearHead):
    """Linear (bias) -> hard-sigmoid."""

    _use_bias = True


class BnSigmoidHead(_LinearHead):
    """Linear (no bias) -> BatchNorm1d(K) -> sigmoid."""

    _norm_kind, _gate_kind = "bn", "sigmoid"


class BnSoftmaxHead(_LinearHead):
    """Linear (no bias) -> BatchNorm1d(K) -> softmax over K (weights sum to 1)."""

    _norm_kind, _gate_kind = "bn", "softmax"


class GnHSigmoidHead(_LinearHead):
    """Linear (no bias) -> GroupNorm(1, K) -> hard-sigmoid (for GroupNorm-based AN)."""

    _norm_kind = "gn"


class MlpHead(_MlpHead):
    """Linear C->2K (bias) -> ReLU -> Linear 2K->K (bias) -> sigmoid."""


class MlpBnHead(_MlpHead):
    """Linear C->2K -> BN -> ReLU -> Linear 2K->K -> BN -> hard-sigmoid (no biases)."""

    _use_bias, _norm_kind, _gate_kind = False, "bn", "hsigmoid"


HEADS: dict[str, type[_Head]] = {
    "default": DefaultHead,
    "linear-sigmoid": LinearSigmoidHead,
    "mlp": MlpHead,
    "mlp-bn": MlpBnHead,
    "linear-hsigmoid": LinearHSigmoidHead,
    "bn-sigmoid": BnSigmoidHead,
    "bn-softmax": BnSoftmaxHead,
    "gn-hsigmoid": GnHSigmoidHead,
}


def _head_class(name: str) -> type[_Head]:
    if name not in HEADS:
        raise UnknownNameError(f"unknown attention head {name!r}; use one of: {', '.join(HEADS)}")
    return HEADS[name]


def create_head(name: str, channels: int, k: int) -> _Head:
    """Build an attention head mapping (B, channels) -> (B, k), with the paper's init.

    Raises:
        UnknownNameError: ``name`` is not in :data:`HEADS`.
    """
    return _head_class(name)(channels, k)


def head_param_count(name: str, channels: int, k: int) -> int:
    """Learnable parameters of head ``name`` (running buffers excluded), without building it.

    Raises:
        UnknownNameError: ``name`` is not in :data:`HEADS`.
    """
    return _head_class(name).param_count(channels, k)


@torch.no_grad()
def constant_output(head: nn.Module, channels: int) -> torch.Tensor:
    """Head output (K,) for an all-zero statistic, computed in eval mode (mode restored)."""
    was_training = head.training
    head.eval()
    try:
        ref = next(head.parameters())
        return head(ref.new_zeros(1, channels))[0]
    finally:
        head.train(was_training)
