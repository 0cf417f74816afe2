"""Normalisation statistics of the fused AttentiveNorm path, from per-(sample, channel) moments.

Given each sample's per-channel mean ``m`` and biased variance ``v`` (B, C), the statistics of a
larger group follow from the law of total variance, without another pass over the feature map
and without the cancellation of ``E[x^2] - E[x]^2``:

    var(group) = mean(v over the group) + var(m over the group)        (all biased)

BatchNorm groups over the batch (one value per channel), GroupNorm over the channels of a group
(one value per sample and group).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["batch_stats", "group_stats", "update_running_stats"]


def group_stats(m: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm mean and biased variance, broadcast back to (B, C)."""
    b, c = m.shape
    shape = (b, groups, c // groups)
    mg = m.view(shape)
    mean = mg.mean(2, keepdim=True)  # (B, G, 1)
    var = v.view(shape).mean(2, keepdim=True) + (mg - mean).square().mean(2, keepdim=True)
    return mean.expand(shape).reshape(b, c), var.expand(shape).reshape(b, c)


def batch_stats(
    bn: nn.Module, m: torch.Tensor, v: torch.Tensor, n: int, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm mean and biased variance (C,) used to normalise; updates running statistics.

    Args:
        bn: the affine-free inner BatchNorm (or torchvision FrozenBatchNorm2d: running only).
        m: (B, C) per-sample means over n positions.
        v: (B, C) per-sample biased variances.
        n: positions per sample and channel.
        training: the AttentiveNorm's mode.
    """
    frozen = not isinstance(bn, nn.modules.batchnorm._BatchNorm)
    if frozen or (not training and bn.running_mean is not None):
        return bn.running_mean, bn.running_var
    mean = m.mean(0)  # (C,); explicit ops: var_mean over dim 0 is 5x slower on CPU
    var = v.mean(0) + (m - mean).square().mean(0)
    if training and bn.track_running_stats:
        update_running_stats(bn, mean, var, m.shape[0] * n)
    return mean, var


@torch.no_grad()
def update_running_stats(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """As ``nn.BatchNorm``: momentum (None = cumulative average), unbiased variance, counter."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    bn.running_var.lerp_(var.to(bn.running_var.dtype) * (count / (count - 1)), factor)
