"""The ``embedspace`` plugin's config: defaults for ``EmbeddingSpace`` when built through the plugin.

``tl_plugins.enable(model, "embedspace", read_basis="full-circuit")`` records these on the model
(the plugin does not change the forward pass); ``space_for(model)`` builds an ``EmbeddingSpace``
from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_embedspace.factored_topk import DEFAULT_BUDGET_BYTES
from tl_embedspace.space import LN_MODES, READ_BASES, WRITE_BASES
from tl_plugins.checks import check_positive_int


@dataclass
class EmbedSpaceConfig:
    """read_basis/write_basis: "auto", "paper", "unembed", "full-circuit", "pinv"; ln: "raw" or
    "as_loaded"; budget_bytes: memory for one chunk of a vocab x vocab product; k: default top-k."""

    read_basis: str = "auto"
    write_basis: str = "auto"
    ln: str = "raw"
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    k: int = 10

    def __post_init__(self):
        if self.read_basis not in ("auto",) + READ_BASES:
            raise ValueError(f"read_basis: got {self.read_basis!r}; accepted: auto, {', '.join(READ_BASES)}")
        if self.write_basis not in ("auto",) + WRITE_BASES:
            raise ValueError(f"write_basis: got {self.write_basis!r}; accepted: auto, {', '.join(WRITE_BASES)}")
        if self.ln not in LN_MODES:
            raise ValueError(f"ln: got {self.ln!r}; accepted: {', '.join(LN_MODES)}")
        check_positive_int(self.budget_bytes, "budget_bytes")
        check_positive_int(self.k, "k")


def space_for(model, **overrides):
    """An ``EmbeddingSpace`` for ``model`` using the config enabled on it (or the defaults)."""
    import tl_plugins
    from tl_embedspace.space import EmbeddingSpace

    cfg = tl_plugins.active(model).get("embedspace") or EmbedSpaceConfig()
    kw = dict(read_basis=cfg.read_basis, write_basis=cfg.write_basis, ln=cfg.ln, budget_bytes=cfg.budget_bytes)
    kw.update(overrides)
    return EmbeddingSpace(model, **kw)
