"""an-search: Attentive Normalization (Li, Sun, Wu, ECCV 2020, arXiv:1908.01259) for any timm
model, and an Optuna search over where and how to use it.

The public API is imported lazily so that ``import an_search`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._compat import filter_torchscript_warning

filter_torchscript_warning()

__version__ = "0.1.0"

__all__ = [
    "AttentiveNorm",
    "ConvertResult",
    "convert",
    "convert_recipe",
    "find_sites",
    "fold_sites",
    "load",
    "save",
]

_LAZY = {
    "AttentiveNorm": ("an_search.layers", "AttentiveNorm"),
    "ConvertResult": ("an_search.conversion", "ConvertResult"),
    "convert": ("an_search.conversion", "convert"),
    "convert_recipe": ("an_search.conversion", "convert_recipe"),
    "find_sites": ("an_search.rewrite", "find_sites"),
    "fold_sites": ("an_search.layers", "fold_sites"),
    "load": ("an_search.rewrite", "load"),
    "save": ("an_search.rewrite", "save"),
}

#: Subpackages, imported on first use as attributes (``an_search.search.run_search(...)``).
_SUBMODULES = frozenset(
    {"conversion", "cost", "data", "errors", "layers", "models", "rewrite", "search", "train"}
)

if TYPE_CHECKING:
    from .conversion import ConvertResult, convert, convert_recipe
    from .layers import AttentiveNorm, fold_sites
    from .rewrite import find_sites, load, save


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"an_search.{name}")
    raise AttributeError(f"module 'an_search' has no attribute {name!r}")
