"""Import-time hygiene shared by the package.

timm and fvcore call ``torch.jit.script``/``torch.jit.trace`` on import or during counting, and
recent torch warns that TorchScript is deprecated (a FutureWarning; a DeprecationWarning
before torch 2.14). We silence exactly that warning and nothing else.
"""

from __future__ import annotations

import warnings

TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def filter_torchscript_warning() -> None:
    """Ignore torch's TorchScript deprecation warning (only that one)."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=category)
