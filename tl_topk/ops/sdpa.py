"""Exact dense attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), in
TransformerLens layout: the pure function behind the ``sdpa`` plugin.

What SDPA runs and what it cannot:
  * causal, square (no KV cache), no padding, no window: ``is_causal=True``, the fused kernel (on the
    CPU torch's flash kernel; on CUDA flash / memory-efficient), linear memory;
  * KV cache (q_pos < k_pos), key padding, sliding windows, non-causal: a boolean
    [batch, 1, q_pos, k_pos] mask (one byte per score, no float score matrix);
  * grouped-query attention: ``enable_gqa=True``, K/V are never repeated;
  * attention soft-caps (Gemma 2): SDPA has no score modifier, so :func:`unsupported_reason` names
    it and the caller takes the dense path.
Rows with no valid key give zeros (as TransformerLens's HookedTransformer does).
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Shaped

from tl_topk.ops.mixed import full_attention


def unsupported_reason(softcap: Optional[float]) -> Optional[str]:
    """Why SDPA cannot compute this attention exactly, or None when it can."""
    if softcap is not None:
        return f"attention soft-cap {softcap:g} (SDPA has no score modifier)"
    return None


def sdpa_attention(
    q: Float[torch.Tensor, "batch query_pos head_index d_head"],
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"],
    v: Float[torch.Tensor, "batch key_pos kv_head_index d_v"],
    *,
    causal: bool,
    key_padding_mask: Optional[Shaped[torch.Tensor, "batch key_pos"]] = None,
    scale: Optional[float] = None,
    window: Optional[int] = None,
) -> Float[torch.Tensor, "batch query_pos head_index d_v"]:
    """Softmax attention z [batch, query_pos, head_index, d_v] through SDPA.

    Args:
        q: [batch, query_pos, head_index, d_head], post-rotary.
        k, v: [batch, key_pos, kv_head_index, d_head] and [..., d_v]; kv_head_index divides
            head_index (query head h reads K/V head h // group, TransformerLens's
            ``repeat_interleave`` order); not repeated.
        causal: query i sits at key position i + key_pos - query_pos (bottom-right, as with a KV
            cache).
        key_padding_mask: [batch, key_pos] bool/int, true for real tokens, or None.
        scale: multiplier of q.k (default 1/sqrt(d_head)); window: sliding-window size (causal).
    """
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None  # TransformerLens passes all ones with a KV cache: keep the fused kernel
    z = full_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                       window=window if causal else None)
    return z.to(v.dtype)


__all__ = ["sdpa_attention", "unsupported_reason"]
