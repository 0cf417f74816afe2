"""Import-time hygiene shared by the package.

timm and fvcore call ``torch.jit.script``/``torch.jit.trace`` on import or during counting, and
recent torch warns that TorchScript is deprecated. We silence exactly that FutureWarning and
nothing else.
"""

from __future__ import annotations

import warnings

TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def filter_torchscript_warning() -> None:
    """Ignore torch's TorchScript deprecation FutureWarning (only that one)."""
    warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
