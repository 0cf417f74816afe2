"""A converted model still traces with plain torch.fx, each AN site one leaf node."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torchvision.models.feature_extraction import create_feature_extractor

import an_search
from an_search.layers import AttentiveNorm, FoldedAttentiveNorm


def _leaves(graph: torch.fx.GraphModule, kind: type) -> list[str]:
    return [
        str(n.target)
        for n in graph.graph.nodes
        if n.op == "call_module" and isinstance(graph.get_submodule(n.target), kind)
    ]


@pytest.mark.parametrize("kw", [{}, {"head": "mlp", "pool": "avgmax", "placement": "all"}])
def test_symbolic_trace_keeps_every_site_as_one_node(kw: dict) -> None:
    torch.manual_seed(0)
    model = an_search.convert("resnet10t", **kw).model
    sites = [n for n, m in model.named_modules() if isinstance(m, AttentiveNorm)]
    x = torch.randn(2, 3, 48, 48)
    for mode in (False, True):  # traced in each mode (fx bakes `self.training` branches in)
        model.train(mode)
        graph = torch.fx.symbolic_trace(model)
        assert _leaves(graph, AttentiveNorm) == sites and len(sites) >= 4
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)


def test_torchvision_feature_extractor_and_folded_models_trace() -> None:
    torch.manual_seed(0)
    model = an_search.convert("resnet10t").model.eval()
    site = next(n for n, m in model.named_modules() if isinstance(m, AttentiveNorm))
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(site).register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 48, 48)
    model(x)
    hook.remove()
    features = create_feature_extractor(model, {site: "an", "layer4": "out"})(x)
    torch.testing.assert_close(features["an"], seen[0], rtol=0, atol=0)
    assert features["out"].shape == (2, 512, 2, 2)

    folded = an_search.fold_sites(model)
    graph = torch.fx.symbolic_trace(folded)
    folded_sites = [n for n, m in folded.named_modules() if isinstance(m, FoldedAttentiveNorm)]
    assert _leaves(graph, FoldedAttentiveNorm) == folded_sites and folded_sites
    torch.testing.assert_close(graph(x), folded(x), rtol=0, atol=0)
