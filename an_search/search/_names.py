"""The names a search space may use, read from the registries that own them."""

from __future__ import annotations

from functools import cache

__all__ = ["INITS", "PER_STAGE", "known_names"]

#: AttentiveNorm's init modes: the paper's random mixture, or start as the replaced norm.
INITS: tuple[str, ...] = ("paper", "preserve")
#: The placement that picks a role per stage (``stage{i}_role``) instead of a preset.
PER_STAGE = "per-stage"


@cache
def known_names() -> dict[str, tuple[str, ...]]:
    """Space key -> allowed names (placement presets, roles, heads, pools, base kinds, inits)."""
    from an_search.layers import BASES, HEADS, POOLS
    from an_search.rewrite import PLACEMENTS, ROLES

    return {
        "placement": (*PLACEMENTS, PER_STAGE),
        "stage_role": ("none", "all", *ROLES),
        "head": tuple(HEADS),
        "pool": tuple(POOLS),
        "base": ("any", *BASES),
        "init": INITS,
    }
