"""The references ICL-vs-GD results are read against, in one module.

Untrained models (Deutch et al.): the same architecture with random weights.

``untrained_like(model, keep="none")`` is the "no training" baseline: every weight random.
``keep="embeddings"`` is "trained embeddings": token and position embeddings, every norm and the
unembedding copied from ``model``, the rest random. One seeded initialisation is built once and then
shared by the ZSL, ICL and FT runs that use it; the same seed gives bit-identical weights, and the
caller's global RNG is left untouched.

The copy is the backend's (``Backend.untrained_copy``): a HookedTransformer gets TransformerLens's
initialisation, a TransformerBridge a Hugging Face model of the same config with Hugging Face's
initialisation, booted as a bridge. So the two backends draw different random weights for the same
seed; what they keep from the trained model (``keep="embeddings"``) is the same.

Random updates: :func:`random_updates_like` is the FT side of SimAOU's random baseline.

The exact identity of von Oswald et al. 2023 (one linear self-attention layer = one GD step on least
squares) is a pure-tensor test oracle and sits at the bottom, in :mod:`tl_iclgd.linear_attention`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Float

from tl_iclgd.capture import backend_of
from tl_iclgd.metrics import same_shape

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


# -- random updates ----------------------------------------------------------------------------------

def random_updates_like(h_zsl: Float[torch.Tensor, "... d"], h_ft: Float[torch.Tensor, "... d"], *,
                        generator: Optional[torch.Generator] = None) -> Float[torch.Tensor, "... d"]:
    """A random FT-side result: h_ZSL plus an isotropic Gaussian direction with the norm of h_FT - h_ZSL.

    h_zsl, h_ft: [..., d] -> [..., d]. Feeding it to :func:`tl_iclgd.metrics.simaou` in place of h_FT
    gives the random baseline (near 0 raw; the normalised variant inflates it like any other update).
    """
    same_shape(h_zsl=h_zsl, h_ft=h_ft)
    r = torch.randn(h_zsl.shape, generator=generator, dtype=torch.float64)
    size = (h_ft.double() - h_zsl.double()).norm(dim=-1, keepdim=True)
    r = r / r.norm(dim=-1, keepdim=True) * size
    return (h_zsl.double() + r).to(h_zsl.dtype)


__all__ = ["untrained_like", "KEEPS", "random_updates_like"]
