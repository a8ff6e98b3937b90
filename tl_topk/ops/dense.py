"""The dense oracle: full scores, the selection rule as a mask, safe softmax, pattern @ V.

Quadratic memory; every other backend is tested against it. Differentiable with plain autograd
(gradients flow only through the kept scores).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from jaxtyping import Float, Shaped

from tl_topk.ops.selection import count_valid, k_per_row, safe_softmax, topk_keep_mask


def soft_cap(scores: torch.Tensor, cap: Optional[float], *, inplace: bool = False) -> torch.Tensor:
    """Attention-score soft-cap ``cap * tanh(scores / cap)`` (Gemma 2's), the one rule every Python
    backend applies (dense, chunked and the threshold pass, flex's ``score_mod``); None leaves
    ``scores`` as they are. ``inplace`` overwrites ``scores`` (the chunked backend's score buffer).
    The Triton kernels spell the same function in-kernel (``_triton_kernels._scores``)."""
    if cap is None:
        return scores
    if inplace:
        return scores.div_(cap).tanh_().mul_(cap)
    return torch.tanh(scores / cap) * cap


def masked_scores(
    q: Float[torch.Tensor, "batch query_pos head_index d_head"],
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"],
    *,
    causal: bool,
    key_padding_mask: Optional[Shaped[torch.Tensor, "batch key_pos"]],
    scale: float,
    softcap: Optional[float],
    window: Optional[int] = None,
) -> Float[torch.Tensor, "batch head_index query_pos key_pos"]:
    """Scaled, soft-capped, masked scores [batch, head_index, query_pos, key_pos] (invalid keys at -inf).

    q: [batch, query_pos, head_index, d_head]; k: [batch, key_pos, kv_head_index, d_head] with
    head_index = group * kv_head_index (query head h reads K/V head h // group, as TransformerLens's
    repeat_interleave does). Computed per K/V group without repeating K. Causal alignment is
    bottom-right (query i at key position i + key_pos - query_pos).
    """
    b, n_q, h, d = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    g = h // h_kv
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qh = q.permute(0, 2, 1, 3).reshape(b, h_kv, g, n_q, d).to(compute) * scale
    kh = k.permute(0, 2, 3, 1).unsqueeze(2).to(compute)  # [b, h_kv, 1, d, n_k]
    s = (qh @ kh).reshape(b, h, n_q, n_k)
    s = soft_cap(s, softcap)
    valid = valid_mask(torch.arange(n_q, device=q.device) + (n_k - n_q), n_k, causal, key_padding_mask, window)
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    return s


def valid_mask(query_positions: torch.Tensor, k_end: int, causal: bool,
               key_padding_mask: Optional[torch.Tensor], window: Optional[int] = None) -> Optional[torch.Tensor]:
    """Bool [batch or 1, 1, len(query_positions), k_end] of valid (query, key) pairs, or None.

    ``query_positions``: key position of each query (``i + k_pos - q_pos`` for query row i).
    ``window`` (with ``causal``): only keys ``p - window < j <= p`` (sliding-window attention).
    """
    mask = None
    if causal:
        keys = torch.arange(k_end, device=query_positions.device)
        mask = keys[None, :] <= query_positions[:, None]
        if window is not None:
            mask = mask & (keys[None, :] > query_positions[:, None] - window)
        mask = mask[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, :k_end].to(device=query_positions.device, dtype=torch.bool)
        pad = pad[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def dense_topk_attention(
    q: Float[torch.Tensor, "batch query_pos head_index d_head"],
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"],
    v: Float[torch.Tensor, "batch key_pos kv_head_index d_v"],
    spec: tuple,
    *,
    causal: bool,
    key_padding_mask: Optional[Shaped[torch.Tensor, "batch key_pos"]] = None,
    scale: float,
    softcap: Optional[float] = None,
    return_pattern: bool = False,
    window: Optional[int] = None,
) -> Union[
    Float[torch.Tensor, "batch query_pos head_index d_v"],
    tuple[
        Float[torch.Tensor, "batch query_pos head_index d_v"],
        Float[torch.Tensor, "batch head_index query_pos key_pos"],
    ],
]:
    """Top-k attention by brute force. Returns z [batch, query_pos, head_index, d_v] (and, with
    ``return_pattern``, the pattern [batch, head_index, query_pos, key_pos]).

    ``spec``: per-head k tuple (see ``tl_topk.ops.selection.per_head_spec``).
    """
    b, n_q, h, _ = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    s = masked_scores(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, softcap=softcap,
                      window=window)
    n_valid = count_valid(n_q, n_k, causal, key_padding_mask, b, q.device, window)
    keep = topk_keep_mask(s.detach(), k_per_row(spec, n_valid, n_k))
    pattern = safe_softmax(s.masked_fill(~keep, float("-inf")))
    g = h // h_kv
    vh = v.permute(0, 2, 1, 3).unsqueeze(2).to(pattern.dtype)  # [b, h_kv, 1, n_k, d_v]
    z = (pattern.reshape(b, h_kv, g, n_q, n_k) @ vh).reshape(b, h, n_q, -1)
    z = z.permute(0, 2, 1, 3).to(v.dtype)
    return (z, pattern) if return_pattern else z
