"""Build a trial's model from its configuration and measure it: params, MACs, latency.

Every trial's model starts from the same random init (``torch.manual_seed(train.seed)`` before
it is built), so differences between trials come from the configuration, not the draw.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from an_search.conversion import convert
from an_search.cost import count_cost
from an_search.layers import fold_sites
from an_search.models import create_model
from an_search.rewrite import Recipe
from an_search.train import DataSpec

from .config import SearchConfig

__all__ = [
    "Built",
    "build_model",
    "cost_input_size",
    "measure_latency_ms",
    "model_latency_ms",
]


@dataclass
class Built:
    """A trial's model before training, its recipe, and its cost (params, macs, latency_ms)."""

    model: nn.Module
    recipe: Recipe
    cost: dict[str, float]


def cost_input_size(cfg: SearchConfig, data: DataSpec) -> tuple[int, int, int]:
    """(C, H, W) at which MACs and latency are measured: ``cost_img_size`` or the proxy size."""
    side = cfg.cost_img_size or cfg.train.img_size
    return (data.in_chans, side, side)


def build_model(
    cfg: SearchConfig, data: DataSpec, config: dict[str, Any], *, latency: bool = True
) -> Built:
    """Build the model a configuration describes, with the same init for every trial, and cost it.

    Args:
        cfg: the search settings (model name, checkpoint, proxy image size, device).
        data: the dataset (classes and input channels).
        config: ``convert()`` arguments; ``{"placement": "none"}`` builds the unconverted model.
        latency: time it too (:func:`model_latency_ms`); False leaves ``latency_ms`` out.
    """
    torch.manual_seed(cfg.train.seed)
    common = {
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "img_size": cfg.train.img_size,
    }
    if config.get("placement") == "none" and not config.get("include"):
        model = create_model(cfg.model, checkpoint=cfg.checkpoint, **common)
        recipe = Recipe.from_selection(model=cfg.model, selected={}, model_kwargs=common)
    else:
        result = convert(cfg.model, **config, **common, checkpoint=cfg.checkpoint, cost=False)
        model, recipe = result.model, result.recipe
    cost = count_cost(model, cost_input_size(cfg, data))
    figures: dict[str, float] = {"params": cost.params, "macs": cost.macs}
    if latency:
        figures["latency_ms"] = model_latency_ms(cfg, data, model)
    return Built(model, recipe, figures)


def model_latency_ms(cfg: SearchConfig, data: DataSpec, model: nn.Module) -> float:
    """:func:`measure_latency_ms` of a trial's model: at the cost input size, on the training
    device, with the threads training will use."""
    threads = torch.get_num_threads()
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    try:
        return measure_latency_ms(
            model, cost_input_size(cfg, data), cfg.train.device, runs=cfg.latency_runs
        )
    finally:
        torch.set_num_threads(threads)


def measure_latency_ms(
    model: nn.Module, input_size: tuple[int, int, int], device: str = "cpu", *, runs: int = 5
) -> float:
    """Median wall time of a batch-1 forward pass in eval mode, in milliseconds, of the model
    as it would be deployed: a copy with each AN site folded (:func:`~an_search.fold_sites`: a
    ``FoldedAttentiveNorm``, without the per-call check of its folded form that a training
    model needs), the same for every trial; the baseline has no site to fold.

    Two warm-up passes first; CUDA is synchronised around each timed pass. The model is left in
    eval mode on ``device``.
    """
    model = fold_sites(model.to(device).eval())
    x = torch.randn(1, *input_size, device=device)
    cuda = torch.device(device).type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(2 + runs):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
