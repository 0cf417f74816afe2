"""Type checks and message pieces shared by the settings' validations."""

from __future__ import annotations

import numbers

__all__ = ["SEED_MAX", "first_line", "is_integer", "is_number"]

#: The largest seed (numpy's legacy seeds, and the loaders' per-epoch torch seeds, stay in range).
SEED_MAX = 2**32 - 1


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (a bool, though an ``int``, is not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
