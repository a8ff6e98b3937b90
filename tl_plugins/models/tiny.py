"""Tiny random models built from configs: GPT-2-like and Llama-like (GQA, rotary, RMSNorm, gated MLP).

Seeded, and built inside ``torch.random.fork_rng()`` so loading one never moves the caller's global
RNG (``HookedTransformerConfig(seed=...)`` reseeds it otherwise).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def _hooked_transformer():
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as exc:  # transformer-lens 4.x
        raise ImportError(
            "tl_plugins.models needs HookedTransformer, which transformer-lens 4.x removed; "
            "install transformer-lens>=2.16.1,<4 (pip install 'transformer-lens==3.9.0')."
        ) from exc
    return HookedTransformer, HookedTransformerConfig


TINY_GPT2 = dict(
    n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=101, n_ctx=128,
    act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
    original_architecture="GPT2LMHeadModel",
)

TINY_LLAMA = dict(
    n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, d_vocab=97,
    n_ctx=128, act_fn="silu", normalization_type="RMS", final_rms=True,
    positional_embedding_type="rotary", rotary_dim=16, rotary_base=10000,
    rotary_adjacent_pairs=False, gated_mlp=True, original_architecture="LlamaForCausalLM",
    default_prepend_bos=False,
)


def build(base: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
          **overrides: Any):
    """Build a random HookedTransformer from ``base`` config fields updated with ``overrides``."""
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    fields = {**base, **overrides}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(seed=seed, dtype=dtype, device=device, **fields)
        model = HookedTransformer(cfg)
    model.eval()
    from tl_plugins.weights import record_processing

    record_processing(model, fold_ln=False, center_writing_weights=False, center_unembed=False,
                      fold_value_biases=False)
    return model


def tiny_gpt2(**options: Any):
    """2 layers, d_model 64, 4 heads, vocab 101, LayerNorm, GELU, learned positions; random weights."""
    return build(TINY_GPT2, **options)


def tiny_llama(**options: Any):
    """2 layers, d_model 64, 4 query heads over 2 K/V heads, rotary, RMSNorm, gated SiLU; random."""
    return build(TINY_LLAMA, **options)
