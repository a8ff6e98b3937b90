"""The baselines top-k attention is measured and checked against, in one place.

- :func:`sdpa_attention`: ``torch.nn.functional.scaled_dot_product_attention`` in TransformerLens
  layout, K/V not repeated: what a user has, the baseline of every speed and memory ratio;
- :func:`dense_math_attention`: TransformerLens's own dense path (repeat K/V, full scores, mask,
  softmax, pattern @ V), the second baseline;
- :func:`paper_style_topk`: Gupta et al.'s reference shape of top-k attention (dense scores per
  query chunk, ``torch.topk``, scatter into a dense buffer), the paper's baseline.

The exact oracle every backend is tested against is the ``dense`` backend itself
(:func:`tl_topk.ops.dense.dense_topk_attention`: the selection rule on full scores). Shapes are
TransformerLens's: q ``[batch, query_pos, head_index, d_head]``, k and v ``[batch, key_pos,
kv_head_index, d_head]``, output ``[batch, query_pos, head_index, d_head]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sdpa_attention", "dense_math_attention", "paper_style_topk"]


def sdpa_attention(q, k, v, *, causal: bool = True) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` in TransformerLens layout, K/V not
    repeated (``enable_gqa``): on the CPU torch's fused (flash) kernel, linear memory."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def dense_math_attention(q, k, v, *, causal: bool = True) -> torch.Tensor:
    """TransformerLens's dense path: repeat K/V, full scores, causal mask, softmax, pattern @ V."""
    h, h_kv = q.shape[2], k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    s = qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ vt).transpose(1, 2)


def paper_style_topk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_top: int, *, causal: bool,
                     chunk: int = 1024) -> torch.Tensor:
    """Gupta et al.'s reference shape: per query chunk, dense scores, torch.topk, softmax over the k
    values, scatter into a dense zero buffer, dense matmul with (repeated) V. Plain autograd.
    A benchmark baseline only (ties are not broken by index)."""
    b, n_q, h, d = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    kr = k.repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    vr = v.repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    qt = q.transpose(1, 2)
    outs = []
    for q0 in range(0, n_q, chunk):
        s = qt[:, :, q0:q0 + chunk] @ kr.transpose(-1, -2) * d ** -0.5
        if causal:
            rows = torch.arange(q0, min(n_q, q0 + chunk), device=q.device) + n_k - n_q
            s = s.masked_fill(torch.arange(n_k, device=q.device)[None, :] > rows[:, None], float("-inf"))
        vals, idx = s.topk(min(k_top, n_k), dim=-1)
        dense = torch.zeros_like(s).scatter(-1, idx, vals.softmax(-1))
        outs.append(dense @ vr)
    return torch.cat(outs, 2).transpose(1, 2)
