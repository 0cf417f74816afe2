"""Normalization sites of a model: what they are, where they sit, what role they play.

A site is a norm MODULE (reachable by name, so it can be swapped on the original model).
Functional norm calls (weight standardisation calling ``F.batch_norm`` on conv weights) are never
sites. Sites inside a leaf module the tracer does not enter (a whole timm block registered as
notrace) are still found by name, with block positions but no graph roles. When the model cannot
be traced at all, discovery falls back to ``named_modules()`` in registration order and the report
says ``traced=False`` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import fx, nn

from ._roles import graph_roles, position_roles
from ._structure import assign_blocks, assign_stages
from .tracer import is_norm_module, trace_model

__all__ = ["Site", "SiteReport", "find_sites"]


@dataclass(frozen=True)
class Site:
    """One normalization module of a model.

    Attributes:
        name: Qualified module name (``layer1.0.bn2``).
        norm_type: Class name (``BatchNormAct2d``).
        base: AN base kind from ``an_search.layers.norm_kind`` (``"unsupported"`` if none).
        channels: Normalized channels C.
        stage: Stage index in execution order, or None (stem, head).
        block: Qualified name of the enclosing block, or None.
        roles: Labels from ``an_search.rewrite.ROLES``, sorted.
        affine: Whether the norm has a learnable scale.
        order: Execution order among the sites (0 first).
        supported: Whether ``AttentiveNorm.from_norm`` can replace it.
    """

    name: str
    norm_type: str
    base: str
    channels: int
    stage: int | None
    block: str | None
    roles: tuple[str, ...]
    affine: bool
    order: int
    supported: bool


@dataclass
class SiteReport:
    """Every site of a model plus how they were found.

    Attributes:
        sites: Sites in execution order.
        traced: True when roles come from an fx graph.
        fallback_reason: One line saying why tracing failed (None when traced).
        num_stages: Number of stages (``stage_keys``).
        stage_keys: Qualified names of the stage containers, in stage order.
        model_class: Class name of the model.
        model_name: timm architecture name from ``pretrained_cfg``, if any.
    """

    sites: list[Site]
    traced: bool
    fallback_reason: str | None = None
    num_stages: int = 0
    stage_keys: list[str] = field(default_factory=list)
    model_class: str = ""
    model_name: str | None = None

    @property
    def supported(self) -> list[Site]:
        """Sites that AN can replace."""
        return [s for s in self.sites if s.supported]

    @property
    def unsupported(self) -> list[Site]:
        """Sites of norm classes AN cannot replace (never selected)."""
        return [s for s in self.sites if not s.supported]

    def by_name(self) -> dict[str, Site]:
        """Site name -> site."""
        return {s.name: s for s in self.sites}


def _channels(m: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        value = getattr(m, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(m, "normalized_shape", None)
    if shape is not None:
        return int(shape if isinstance(shape, int) else shape[-1])
    weight = getattr(m, "weight", None)
    return int(weight.numel()) if weight is not None else 0


def _norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Norm modules by name, skipping the insides of norms and of AttentiveNorm layers."""
    from an_search.layers import AttentiveNorm

    found: dict[str, nn.Module] = {}
    opaque: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in opaque):
            continue
        if isinstance(m, AttentiveNorm):
            opaque.append(name)
        elif is_norm_module(m):
            found[name] = m
            opaque.append(name)
    return found


def _exec_order(names: list[str], graph: fx.Graph | None) -> dict[str, int]:
    """Execution order: graph position of the site, or of the leaf module holding it."""
    position: dict[str, int] = {}
    if graph is not None:
        for i, node in enumerate(graph.nodes):
            if node.op == "call_module":
                position.setdefault(str(node.target), i)

    def key(item: tuple[int, str]) -> tuple[float, int]:
        reg, name = item
        scope = name
        while scope:
            if scope in position:
                return (position[scope], reg)
            scope = scope.rpartition(".")[0]
        return (math.inf, reg)

    ranked = sorted(enumerate(names), key=key)
    return {name: rank for rank, (_, name) in enumerate(ranked)}


def find_sites(model: nn.Module, *, img_size: int | None = None) -> SiteReport:
    """Find and label every normalization site of ``model`` (the model is not changed).

    Args:
        model: Any module, typically a timm model.
        img_size: Unused by symbolic tracing (kept for API stability).

    Returns:
        A :class:`SiteReport`; ``traced=False`` means names, blocks and stages only.
    """
    from an_search.layers import is_supported_norm, norm_kind

    del img_size
    norms = _norm_modules(model)
    names = list(norms)
    result = trace_model(model)
    order = _exec_order(names, result.graph)
    blocks = assign_blocks(names, dict(model.named_modules()))
    stages, keys = assign_stages(blocks, order)
    roles: dict[str, set[str]] = {n: set() for n in names}
    shortcuts: set[str] = set()
    if result.graph is not None:
        nodes = {}
        for node in result.graph.nodes:
            if node.op == "call_module" and str(node.target) in norms:
                nodes.setdefault(str(node.target), node)
        found, shortcuts = graph_roles(result.graph, dict(model.named_modules()), nodes)
        roles.update(found)
    for name, pos in position_roles(blocks, order, shortcuts).items():
        roles[name] |= pos
    sites = [
        Site(
            name=name,
            norm_type=type(m).__name__,
            base=norm_kind(m) or "unsupported",
            channels=_channels(m),
            stage=stages[name],
            block=blocks[name],
            roles=tuple(sorted(roles[name])),
            affine=getattr(m, "weight", None) is not None,
            order=order[name],
            supported=bool(is_supported_norm(m)),
        )
        for name, m in norms.items()
    ]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return SiteReport(
        sites=sorted(sites, key=lambda s: s.order),
        traced=result.graph is not None,
        fallback_reason=result.fallback_reason,
        num_stages=len(keys),
        stage_keys=keys,
        model_class=type(model).__name__,
        model_name=cfg.get("architecture"),
    )
