"""Pure tensor functions for top-k attention and top-k feed-forward (no model, no TransformerLens).

Layers, bottom up: ``selection`` (the deterministic top-k rule and per-row k), ``dense`` (the oracle),
``chunked`` (linear-memory autograd.Function, the CPU path), ``threshold`` (per-row boundaries, pass 1
of the threshold form), ``triton_backend`` (the GPU backend: availability and the call into the kernels of ``_triton_kernels``), ``flex`` (FlexAttention with a threshold
``score_mod``), ``mixed`` (heads that keep every key go through SDPA), ``backend`` (which backend a
call asks for: ``use_backend``, ``TL_TOPK_BACKEND``), ``attention`` (the one functional op: validate,
plan, dispatch), ``feedforward`` (top-k activations).

    with tl_topk.ops.use_backend("chunked"):   # calls inside that pass no explicit backend
        z = tl_topk.topk_attention(q, k, v, 32, causal=True)
"""

from tl_topk.ops.backend import BACKENDS, use_backend

__all__ = ["BACKENDS", "use_backend"]
