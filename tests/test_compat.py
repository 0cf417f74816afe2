"""The package silences torch's TorchScript deprecation warning, and only that one."""

from __future__ import annotations

import warnings

from an_search._compat import filter_torchscript_warning


def test_only_the_torchscript_deprecation_is_silenced() -> None:
    """torch 2.14 warns with a FutureWarning, torch before it with a DeprecationWarning (timm
    and fvcore script and trace on import and while counting): both are silenced; the same
    categories with other messages are not."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_torchscript_warning()
        for category in (FutureWarning, DeprecationWarning):
            warnings.warn(
                "`torch.jit.script` is deprecated. Use torch.compile", category, stacklevel=1
            )
            warnings.warn(
                "`torch.jit.trace` is deprecated. Use torch.export", category, stacklevel=1
            )
        warnings.warn("`torch.jit.script` is fine", DeprecationWarning, stacklevel=1)
        warnings.warn("another API is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "`torch.jit.script` is fine",
        "another API is deprecated",
    ]
