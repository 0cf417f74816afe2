"""The cost a trial is measured at: ``measure_latency_ms`` times the model as deployed."""

from __future__ import annotations

from collections import Counter

import timm
import torch

from an_search import convert
from an_search.layers import AttentiveNorm, FoldedAttentiveNorm
from an_search.search import measure_latency_ms


def test_latency_is_the_deployed_models() -> None:
    """The batch-1 latency runs a copy with its sites folded (``fold_sites``): every AN site as
    a FoldedAttentiveNorm, none as the AttentiveNorm that checks its folded form at every call;
    the trial's own model keeps its sites and is left in eval mode."""
    torch.manual_seed(0)
    model = convert(
        timm.create_model("resnet10t", pretrained=False, num_classes=10), placement="all",
        cost=False,
    ).model  # fmt: skip
    sites = sum(isinstance(m, AttentiveNorm) for m in model.modules())
    called: Counter[type] = Counter()

    def record(module: torch.nn.Module, args: tuple, out: object) -> None:
        called[type(module)] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        ms = measure_latency_ms(model, (3, 32, 32), runs=3)
    finally:
        handle.remove()
    assert ms > 0
    assert called[FoldedAttentiveNorm] == sites * (2 + 3) and called[AttentiveNorm] == 0
    assert sum(isinstance(m, AttentiveNorm) for m in model.modules()) == sites == 14
    assert not model.training
