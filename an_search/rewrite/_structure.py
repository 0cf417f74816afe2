"""Blocks and stages from module names alone (no graph needed).

A *block* is the innermost proper ancestor of a site that
  - is a direct child of a container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``, a
    subclass, or a timm-style class named ``*Stage`` such as RegNet's ``RegStage``),
  - is not a mere *layer* (a conv-norm-act unit such as timm ``ConvNormAct``: exactly one norm
    child, every other child a leaf),
  - and contains no other block.
Its parent container is the *stage key*; a key that is a proper ancestor of another key
(DenseNet's ``features`` holding ``features.denseblock1``) is not a stage, and the sites of its
blocks count as outside any block. Stages are numbered in execution order. A site outside any
block (stem, transition, downsample, final norm) takes the stage of the key sharing the longest
dotted name prefix with it; on a tie, the next stage in execution order; no shared prefix, or no
next stage -> ``None`` (stem/head).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

__all__ = ["assign_blocks", "assign_stages"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(name: str) -> list[str]:
    """Proper ancestors of a qualified name, innermost first, root ("") excluded."""
    out = []
    while "." in name:
        name = _parent(name)
        out.append(name)
    return out


def _is_under(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".")


def _is_container(module: nn.Module | None) -> bool:
    return isinstance(module, _CONTAINERS) or type(module).__name__.endswith("Stage")


def _is_layer(module: nn.Module, norms: set[nn.Module]) -> bool:
    """One norm child, every other child a leaf: a conv-norm-act unit, not a block."""
    children = list(module.children())
    if sum(c in norms for c in children) != 1:
        return False
    return all(c in norms or next(c.children(), None) is None for c in children)


def assign_blocks(names: Sequence[str], modules: Mapping[str, nn.Module]) -> dict[str, str | None]:
    """Map each site name to its block name, or None when it lies outside any block.

    Args:
        names: Qualified names of the sites.
        modules: ``dict(model.named_modules())``.
    """
    norms = {modules[n] for n in names}
    innermost: dict[str, str | None] = {}
    for name in names:
        innermost[name] = next(
            (
                a
                for a in _ancestors(name)
                if _is_container(modules.get(_parent(a))) and not _is_layer(modules[a], norms)
            ),
            None,
        )
    candidates = {b for b in innermost.values() if b is not None}
    blocks = {b for b in candidates if not any(_is_under(c, b) for c in candidates)}
    keys = {_parent(b) for b in blocks}
    bad_keys = {k for k in keys if any(_is_under(other, k) for other in keys)}
    return {
        n: b if b in blocks and _parent(b) not in bad_keys else None for n, b in innermost.items()
    }


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        count += 1
    return count


def assign_stages(
    blocks: Mapping[str, str | None], order: Mapping[str, int]
) -> tuple[dict[str, int | None], list[str]]:
    """Number the stages and give every site its stage.

    Args:
        blocks: Site name -> block name (from :func:`assign_blocks`).
        order: Site name -> execution order.

    Returns:
        (site name -> stage index or None, stage keys in stage order).
    """
    first: dict[str, int] = {}
    for name, block in blocks.items():
        if block is not None:
            key = _parent(block)
            first[key] = min(first.get(key, order[name]), order[name])
    keys = sorted(first, key=lambda k: (first[k], k))
    index = {k: i for i, k in enumerate(keys)}
    stages: dict[str, int | None] = {}
    for name, block in blocks.items():
        if block is not None:
            stages[name] = index[_parent(block)]
            continue
        scores = {k: _common_prefix(name, k) for k in keys}
        best = max(scores.values(), default=0)
        tied = [k for k in keys if scores[k] == best]
        if best == 0:
            stages[name] = None
        elif len(tied) == 1:
            stages[name] = index[tied[0]]
        else:
            nxt = [k for k in tied if first[k] > order[name]]
            stages[name] = index[nxt[0]] if nxt else None
    return stages, keys
