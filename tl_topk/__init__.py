"""tl_topk: top-k attention (Gupta et al. 2021) as a drop-in for TransformerLens attention.

    import tl_plugins, tl_topk
    tl_plugins.enable(model, "topk", k=32)             # every layer, every head
    tl_plugins.enable(model, "topk", k=0.25, ff_k=64)  # a quarter of the valid keys; top-64 MLP units
    z = tl_topk.topk_attention(q, k, v, 32, causal=True)  # the functional op, TL layout

Layout: ``ops/`` pure tensor functions (selection rule, dense oracle, chunked autograd op, Triton
kernel, FlexAttention path, top-k feed-forward); ``config.py`` and ``integration.py`` (model-aware); ``plugin.py``
(hookimpls); ``cli.py``, ``bench.py``, ``analysis.py``, ``report.py`` on top.
"""

from tl_topk.config import TopKConfig
from tl_topk.ops.attention import BACKENDS, topk_attention
from tl_topk.ops.feedforward import topk_activation
from tl_topk.ops.selection import topk_keep_mask

__all__ = ["topk_attention", "topk_activation", "topk_keep_mask", "TopKConfig", "BACKENDS"]
