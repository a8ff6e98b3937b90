"""Untrained baselines (Deutch et al.): the same architecture with random weights.

``untrained_like(model, keep="none")`` is the "no training" baseline: every weight random.
``keep="embeddings"`` is "trained embeddings": token and position embeddings, every norm and the
unembedding copied from ``model``, the rest random. One seeded initialisation is built once and then
shared by the ZSL, ICL and FT runs that use it; the same seed gives bit-identical weights, and the
caller's global RNG is left untouched.

The copy is the backend's (``Backend.untrained_copy``): a HookedTransformer gets TransformerLens's
initialisation, a TransformerBridge a Hugging Face model of the same config with Hugging Face's
initialisation, booted as a bridge. So the two backends draw different random weights for the same
seed; what they keep from the trained model (``keep="embeddings"``) is the same.
"""

from __future__ import annotations

from typing import Any

import torch

from tl_iclgd.capture import backend_of

KEEPS = ("none", "embeddings")


def untrained_like(model: Any, keep: str = "none", seed: int = 0):
    """A model of ``model``'s type, config and tokenizer with random weights (see the module doc)."""
    if keep not in KEEPS:
        raise ValueError(f"keep: got {keep!r}; accepted: {', '.join(KEEPS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: got {seed!r}; accepted: an int")
    new = backend_of(model).untrained_copy(seed=seed, keep_embeddings=(keep == "embeddings"))
    for name, p in backend_of(new).named_parameters().items():
        if not torch.isfinite(p).all():  # pragma: no cover - guards against an init that left memory unset
            raise RuntimeError(f"untrained_like: parameter {name} is not finite after initialisation")
    return new


__all__ = ["untrained_like", "KEEPS"]
