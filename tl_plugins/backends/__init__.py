"""Backends: everything a plugin needs from a model, behind one interface (:class:`Backend`).

``detect(model)`` returns the backend object for a model or raises ``UnsupportedModelError``
listing the supported model types. Built in: ``hooked`` (HookedTransformer) and ``bridge``
(TransformerBridge). A new model family is one new file: subclass ``Backend`` and call
``register_backend(MyBackend)``; backends registered later are asked first.
"""

from __future__ import annotations

from typing import Any

from tl_plugins.backends.base import HOOK_KINDS, WEIGHT_NAMES, Backend
from tl_plugins.backends.bridge import BridgeBackend
from tl_plugins.backends.hooked import HookedBackend
from tl_plugins.errors import UnsupportedModelError

__all__ = ["Backend", "HookedBackend", "BridgeBackend", "HOOK_KINDS", "WEIGHT_NAMES", "detect",
           "register_backend", "unregister_backend", "registered_backends"]

_BACKENDS: list[type[Backend]] = [HookedBackend, BridgeBackend]


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Add a backend class (asked before the built-in ones); returns it, so it works as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"cls: expected a subclass of tl_plugins.backends.Backend, got {cls!r}")
    if cls not in _BACKENDS:
        _BACKENDS.insert(0, cls)
    return cls


def unregister_backend(cls: type[Backend]) -> None:
    """Remove a backend added with :func:`register_backend` (built-ins stay)."""
    if cls in (HookedBackend, BridgeBackend):
        raise ValueError(f"cls: {cls.__name__} is built in and cannot be removed")
    if cls in _BACKENDS:
        _BACKENDS.remove(cls)


def registered_backends() -> list[type[Backend]]:
    """The backend classes in the order ``detect`` asks them."""
    return list(_BACKENDS)


def detect(model: Any) -> Backend:
    """Return the backend that knows ``model``; raise ``UnsupportedModelError`` otherwise."""
    for cls in _BACKENDS:
        if cls.accepts(model):
            return cls(model)
    accepted = "; ".join(cls.describe() for cls in _BACKENDS)
    raise UnsupportedModelError(
        f"model: got an object of type {type(model).__module__}.{type(model).__qualname__}; "
        f"accepted: {accepted} (e.g. tl_plugins.models.load('tiny-gpt2'))."
    )
