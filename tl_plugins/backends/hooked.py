"""The ``hooked`` backend: HookedTransformer and HookedSAETransformer (transformer-lens 2.16-3.x)."""

from __future__ import annotations

import sys
from typing import Any


def _hooked_transformer_class():
    """HookedTransformer, or None on transformer-lens 4.x (which removed it).

    Looked up lazily: a model can only be a HookedTransformer if transformer_lens was imported, and
    importing it takes seconds, which ``tl-plugins --help`` should not pay.
    """
    if "transformer_lens" not in sys.modules:
        return None
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # pragma: no cover - transformer-lens 4.x
        return None
    return HookedTransformer


class HookedBackend:
    """Where the seams of a HookedTransformer are: ``blocks[l].attn`` and ``blocks[l].mlp``."""

    name = "hooked"

    def __init__(self, model: Any):
        self.model = model

    @staticmethod
    def accepts(model: Any) -> bool:
        cls = _hooked_transformer_class()
        return cls is not None and isinstance(model, cls)

    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    def attention_modules(self) -> list[tuple[int, Any]]:
        """(layer, attention module) for every block."""
        return [(i, block.attn) for i, block in enumerate(self.model.blocks)]

    def mlp_modules(self) -> list[tuple[int, Any]]:
        """(layer, MLP module) for every block that has one (attention-only models have none)."""
        out = []
        for i, block in enumerate(self.model.blocks):
            mlp = getattr(block, "mlp", None)
            if mlp is not None:
                out.append((i, mlp))
        return out

    def __repr__(self) -> str:
        return f"HookedBackend({type(self.model).__name__}, n_layers={self.n_layers})"
