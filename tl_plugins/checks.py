"""Argument checks that the host and every plugin share, each rule written once.

Messages follow the house style ``"{arg}: got {value!r}; accepted: ..."``. A bool is never taken for
an int (``True`` is not layer 1), and nothing is clamped.

    check_index(layer, n_layers, "layer")          # an int in [0, n_layers), else IndexError
    check_positive_int(budget_bytes, "budget_bytes")  # an int > 0, else ValueError
"""

from __future__ import annotations

import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """True for an integral number that is not a bool (``numbers.Integral``: int, numpy and torch ints)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_index(value: Any, size: int, arg: str, *, where: str = "") -> int:
    """``value`` as an int in ``[0, size)``, else an ``IndexError`` naming ``arg`` (``where`` is added
    after the value, e.g. ``" in layer 3"``)."""
    if not is_int(value) or not 0 <= int(value) < size:
        raise IndexError(f"{arg}: got {value!r}{where}; accepted: an int in [0, {size - 1}]")
    return int(value)


def check_positive_int(value: Any, arg: str) -> int:
    """``value`` as an int > 0, else a ``ValueError`` naming ``arg``."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{arg}: got {value!r}; accepted: a positive int")
    return int(value)


__all__ = ["check_index", "check_positive_int", "is_int"]
