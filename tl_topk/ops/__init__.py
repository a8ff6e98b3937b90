"""Pure tensor functions for top-k attention and top-k feed-forward (no model, no TransformerLens).

Layers, bottom up: ``selection`` (the deterministic top-k rule and per-row k), ``dense`` (the oracle),
``chunked`` (linear-memory autograd.Function, the CPU path), ``threshold`` (per-row boundaries, pass 1
of the threshold form), ``triton_backend`` (the GPU backend: availability and the call into the kernels of ``_triton_kernels``), ``flex`` (FlexAttention with a threshold
``score_mod``), ``mixed`` (heads that keep every key go through SDPA), ``attention`` (the one
functional op and its backend dispatch), ``feedforward`` (top-k activations).
"""
