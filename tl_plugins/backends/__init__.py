"""Backends: the few facts about a model family that plugins need (where attention and MLPs are).

``detect(model)`` returns the backend object for a model or raises ``UnsupportedModelError`` naming
what was passed and what is accepted. A new model family is one new file here.
"""

from __future__ import annotations

from typing import Any

from tl_plugins.backends.hooked import HookedBackend
from tl_plugins.errors import UnsupportedModelError

__all__ = ["HookedBackend", "detect"]


def _is_bridge(model: Any) -> bool:
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def detect(model: Any) -> HookedBackend:
    """Return the backend that knows ``model``; raise ``UnsupportedModelError`` otherwise."""
    if HookedBackend.accepts(model):
        return HookedBackend(model)
    if _is_bridge(model):
        raise UnsupportedModelError(
            "model: got a TransformerBridge; tl_plugins supports HookedTransformer and "
            "HookedSAETransformer (transformer-lens 2.16-3.x) for now. TransformerBridge support is "
            "tracked in its own issue; convert with HookedTransformer and the same weights meanwhile."
        )
    raise UnsupportedModelError(
        f"model: got an object of type {type(model).__module__}.{type(model).__qualname__}; "
        "expected a TransformerLens HookedTransformer or HookedSAETransformer "
        "(e.g. tl_plugins.models.load('tiny-gpt2'))."
    )
