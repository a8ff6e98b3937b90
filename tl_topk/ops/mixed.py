"""Layers whose heads mix top-k and dense: the dense heads go through SDPA, the rest through top-k.

A per-head spec such as ``{(layer, head): k}`` leaves the layer's other heads dense. Handing such a
call to a linear-memory backend as one piece would make every head keep ``max k = k_pos`` slots per
row: O(n^2) saved state, worse than dense attention. Here the heads are split: the top-k heads go to
the chosen backend with their own (small) k, and the heads that keep every key go to
``scaled_dot_product_attention``, whose CPU and CUDA kernels run causal attention in linear memory.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Shaped

from tl_topk.ops.dense import valid_mask


def full_attention(
    q: Float[torch.Tensor, "batch query_pos head_index d_head"],
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"],
    v: Float[torch.Tensor, "batch key_pos kv_head_index d_v"],
    *,
    causal: bool,
    key_padding_mask: Optional[Shaped[torch.Tensor, "batch key_pos"]],
    scale: float,
    window: Optional[int] = None,
) -> Float[torch.Tensor, "batch query_pos head_index d_v"]:
    """Plain softmax attention in TransformerLens layout; rows without a valid key give zeros.

    q [batch, query_pos, head_index, d_head]; k, v [batch, key_pos, kv_head_index, d_head or d_v]
    (kv_head_index divides head_index; not repeated). Causal alignment is bottom-right, as everywhere in tl_topk. Causal attention over
    a square call without padding runs SDPA's causal kernel (linear memory); other calls pass a
    boolean [batch, 1, q_pos, k_pos] mask (one byte per score).
    """
    b, n_q, h, _ = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = h != h_kv
    if causal and key_padding_mask is None and n_q == n_k and window is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa).transpose(1, 2)
    mask = valid_mask(torch.arange(n_q, device=q.device) + (n_k - n_q), n_k, causal, key_padding_mask, window)
    if mask is None:
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=gqa).transpose(1, 2)
    has_key = mask.any(-1, keepdim=True)
    # A row with no valid key would be 0/0: let it see every key, then zero it (its gradient is 0).
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask | ~has_key, scale=scale, enable_gqa=gqa)
    return (out * has_key.to(out.dtype)).transpose(1, 2)


def _select_heads(q, k, v, heads: Sequence[int]):
    """q, k, v restricted to query ``heads`` (sorted). Whole K/V groups keep grouped-query
    attention without copies of K/V per query head; a partial group gets its K/V head once per
    selected query head (O(n d) each)."""
    h, h_kv = q.shape[2], k.shape[2]
    g = h // h_kv
    idx = torch.tensor(heads, device=q.device)
    groups = sorted({i // g for i in heads})
    if len(heads) == len(groups) * g:  # every selected group is complete
        kv = torch.tensor(groups, device=q.device)
    else:
        kv = idx // g
    return q.index_select(2, idx), k.index_select(2, kv), v.index_select(2, kv)


def mixed_heads_attention(
    q: Float[torch.Tensor, "batch query_pos head_index d_head"],
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"],
    v: Float[torch.Tensor, "batch key_pos kv_head_index d_v"],
    spec: tuple,
    dense_heads: Sequence[int],
    *,
    causal: bool,
    key_padding_mask: Optional[Shaped[torch.Tensor, "batch key_pos"]],
    scale: float,
    sparse_fn: Callable,
    window: Optional[int] = None,
) -> Float[torch.Tensor, "batch query_pos head_index d_v"]:
    """z [batch, query_pos, head_index, d_v]: ``dense_heads`` through ``full_attention``, the others through
    ``sparse_fn(q, k, v, spec)`` (``tl_topk.topk_attention`` with the caller's options)."""
    h = q.shape[2]
    dense = sorted(dense_heads)
    sparse = [i for i in range(h) if i not in set(dense)]
    qs, ks, vs = _select_heads(q, k, v, sparse)
    z_sparse = sparse_fn(qs, ks, vs, tuple(spec[i] for i in sparse))
    qd, kd, vd = _select_heads(q, k, v, dense)
    z_dense = full_attention(qd, kd, vd, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                             window=window)
    order = torch.tensor(sparse + dense, device=q.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(h, device=q.device)
    return torch.cat([z_sparse, z_dense.to(z_sparse.dtype)], dim=2).index_select(2, inverse)
