"""AN modules as leaves of any torch.fx tracer."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


def traced_input(module: nn.Module, x: object) -> bool:
    """Whether ``x`` is a torch.fx proxy traced through ``module`` (not ``module`` as the root)."""
    return isinstance(x, torch.fx.Proxy) and x.tracer.root is not module


def fx_leaf(module: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record ``module`` as one ``call_module`` node of the graph ``x`` is traced into.

    AN's forward branches on its input's device, dtype and layout, which torch.fx cannot trace
    through; any tracer (``torch.fx.symbolic_trace``, torchvision's feature extractor, FX
    quantization) gets the site as a leaf, as it gets torch.nn's norms, and the traced
    module runs the site's own forward. timm's tracer and an-search's know it as a leaf."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})
