"""tl_topk: top-k attention (Gupta et al. 2021) as a drop-in for TransformerLens attention.

    import tl_plugins, tl_topk
    tl_plugins.enable(model, "topk", k=32)             # every layer, every head
    tl_plugins.enable(model, "topk", k=0.25, ff_k=64)  # a quarter of the valid keys; top-64 MLP units
    z = tl_topk.topk_attention(q, k, v, 32, causal=True)  # the functional op, TL layout
    result = tl_topk.calibrate(model, tokens, budget=0.01)  # k per (layer, head) for a perplexity budget
    tl_plugins.enable(model, "topk", k=result.k)
    tl_plugins.enable(model, "sdpa")                   # exact dense attention through SDPA
    with tl_topk.use_backend("chunked"):               # calls that name no backend use this one
        logits = model(tokens)

Layout: ``ops/`` pure tensor functions (selection rule, dense oracle, chunked autograd op, Triton
kernel, FlexAttention path, top-k feed-forward); ``config.py`` and ``seam_handlers.py`` (model-aware); ``plugin.py``
(hookimpls); ``reference.py`` (the baselines: SDPA, the dense math path, the paper's shape);
``cli.py``, ``bench.py``, ``analysis.py``, ``report.py`` on top.
"""

from tl_topk.analysis import PatternSparsity, PerplexitySweep, pattern_sparsity, perplexity, perplexity_sweep
from tl_topk.calibrate import CalibrationResult, calibrate
from tl_topk.config import SDPAConfig, TopKConfig
from tl_topk.ops.attention import BACKENDS, topk_attention
from tl_topk.ops.backend import use_backend
from tl_topk.ops.feedforward import topk_activation
from tl_topk.ops.selection import topk_keep_mask

__all__ = ["topk_attention", "topk_activation", "topk_keep_mask", "TopKConfig", "SDPAConfig", "BACKENDS",
           "use_backend",
           "calibrate", "CalibrationResult",
           "perplexity", "perplexity_sweep", "PerplexitySweep", "pattern_sparsity", "PatternSparsity"]
