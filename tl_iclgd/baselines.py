"""Untrained baselines (Deutch et al.): the same architecture with random weights.

``untrained_like(model, keep="none")`` is the "no training" baseline: every weight random.
``keep="embeddings"`` is "trained embeddings": token and position embeddings, every norm and the
unembedding copied from ``model``, the rest random. One seeded initialisation is built once and then
shared by the ZSL, ICL and FT runs that use it; the same seed gives bit-identical weights, and the
caller's global RNG is left untouched.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

KEEPS = ("none", "embeddings")


def untrained_like(model: Any, keep: str = "none", seed: int = 0):
    """A HookedTransformer with ``model``'s config and tokenizer and random weights (see module doc)."""
    if keep not in KEEPS:
        raise ValueError(f"keep: got {keep!r}; accepted: {', '.join(KEEPS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: got {seed!r}; accepted: an int")
    from transformer_lens import HookedTransformer

    from tl_plugins.weights import record_processing

    cfg = copy.deepcopy(model.cfg)
    cfg.seed = None  # HookedTransformerConfig(seed=...) would reseed the global RNG
    cfg.init_weights = True  # a cfg built for loading may say False: torch.empty would stay garbage
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        tok = getattr(model, "tokenizer", None)
        kw = {"default_padding_side": "right"} if tok is not None else {}
        new = HookedTransformer(cfg, tokenizer=tok, move_to_device=False, **kw)
    new.to(cfg.device, print_details=False)
    if keep == "embeddings":
        src = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in new.named_parameters():
                if (name.startswith(("embed.", "pos_embed.", "unembed.", "ln_final."))
                        or ".ln1." in name or ".ln2." in name):
                    p.copy_(src[name])
    new.eval()
    for name, p in new.named_parameters():
        if not torch.isfinite(p).all():  # pragma: no cover - guards against an init that left memory unset
            raise RuntimeError(f"untrained_like: parameter {name} is not finite after initialisation")
    record_processing(new, fold_ln=False, center_writing_weights=False, center_unembed=False,
                      fold_value_biases=False)
    return new


__all__ = ["untrained_like", "KEEPS"]
