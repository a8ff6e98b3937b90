"""Pure tensor functions for top-k attention and top-k feed-forward (no model, no TransformerLens).

Layers, bottom up: ``selection`` (the deterministic top-k rule and per-row k), ``dense`` (the oracle),
``chunked`` (linear-memory autograd.Function, the CPU path), ``triton_kernels`` (GPU kernel),
``attention`` (the one functional op and its backend dispatch), ``feedforward`` (top-k activations).
"""
