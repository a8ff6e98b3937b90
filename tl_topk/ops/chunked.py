"""Chunked top-k attention: linear memory in the forward and the backward (the CPU path).

Queries are processed in chunks, so the score buffer is [chunk, keys] and never [queries, keys].
Each chunk keeps only the selected keys: probabilities and key indices, O(n k) in all, are what the
custom ``autograd.Function`` saves. The forward gathers the k selected V rows per query instead of
multiplying a scattered dense pattern by V (Gupta et al.'s reference does the latter); the backward
needs no recomputation of scores at all, because with the selection fixed every gradient is a sum
over the k saved (query, key) pairs: gather K/V rows, scatter-add into dK/dV.

Grouped-query attention: query head h reads K/V head h // group; K/V are never repeated.
"""

from __future__ import annotations

from typing import Optional

import torch

from tl_topk.ops.dense import valid_mask
from tl_topk.ops.selection import topk_select

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes of transient buffers per chunk


def chunk_rows(per_row_bytes: int, n_rows: int, budget: int, chunk_size: Optional[int]) -> int:
    """Query rows per chunk: ``chunk_size`` if given, else as many as fit ``budget``."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n_rows))
    return max(1, min(n_rows, budget // max(1, per_row_bytes)))


def _flat_rows(idx: torch.Tensor, n_k: int) -> torch.Tensor:
    """idx [b, h_kv, g, c, kk] of keys -> row numbers into x.reshape(b * h_kv * n_k, d), flattened."""
    b, h_kv = idx.shape[:2]
    base = torch.arange(b * h_kv, device=idx.device).view(b, h_kv, 1, 1, 1) * n_k
    return (idx + base).reshape(-1)


def _gather_rows(x: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """x [b, h_kv, n_k, d], flat rows (``_flat_rows``) -> [*shape, d] (whole rows, one index each)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows).reshape(*shape, x.shape[-1])


def _scatter_rows(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """out.reshape(-1, d)[rows] += src rows; out [b, h_kv, n_k, d] contiguous."""
    # index_put_(accumulate=True) is several times faster than index_add_ on CPU when many
    # queries pick the same keys (attention sinks), and it is deterministic there.
    out.view(-1, out.shape[-1]).index_put_((rows,), src.reshape(-1, out.shape[-1]), accumulate=True)


def chunk_scores(qh, kt, q0, q1, offset, causal, key_padding_mask, scale, softcap, compute, window=None):
    """Scores of query rows ``q0:q1`` against the keys they can see: ``(k_start, k_end, s)`` with
    ``s`` [b, h_kv, g, q1 - q0, k_end - k_start] for keys ``k_start:k_end``, scaled, soft-capped,
    causal (with ``window``: sliding-window) and padding masks at -inf; or ``None`` when no row of
    the chunk sees any key. Without a window ``k_start`` is 0; with one, keys before the chunk's
    first window are never scored (linear time as well as memory).

    ``qh`` [b, h_kv, g, n_q, d] (query head h = kv head h // g, member h % g); ``kt`` [b, h_kv, d,
    n_k] in ``compute`` dtype (K transposed once by the caller); query row i sits at key position
    i + ``offset``. One batched matmul over (b, h_kv) with the group's query heads stacked as rows,
    so K is neither repeated nor broadcast-copied.
    """
    b, h_kv, g, _, d = qh.shape
    n_k = kt.shape[-1]
    k_end = min(n_k, q1 + offset) if causal else n_k
    k_start = max(0, q0 + offset - window + 1) if (causal and window is not None) else 0
    if k_end <= k_start:
        return None
    c = q1 - q0
    # Scale q (O(rows d)) rather than the scores (O(rows n)).
    qc = (qh[:, :, :, q0:q1].to(compute) * scale).reshape(b, h_kv, g * c, d)
    s = (qc @ kt[..., k_start:k_end]).view(b, h_kv, g, c, k_end - k_start)
    if softcap is not None:
        s.div_(softcap).tanh_().mul_(softcap)
    if causal:
        # Without a window, keys before the chunk's first query position are visible to every row:
        # mask only the diagonal band. A window also masks keys too far behind each row.
        lo = max(0, q0 + offset) if window is None else k_start
        band = valid_mask(torch.arange(q0, q1, device=qh.device) + offset, k_end, True, None, window)
        s[..., lo - k_start:].masked_fill_(~band[..., lo:k_end].unsqueeze(1), float("-inf"))
    if key_padding_mask is not None:
        pad = key_padding_mask[:, k_start:k_end].to(device=qh.device, dtype=torch.bool)
        s.masked_fill_(~pad[:, None, None, None, :], float("-inf"))
    return k_start, k_end, s


class ChunkedTopKAttention(torch.autograd.Function):
    """z = top-k attention (see ``tl_topk.topk_attention``) with O(n k) saved state."""

    @staticmethod
    def forward(ctx, q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap, chunk_size, budget,
                window=None):
        # q [b, n_q, h, d]; k [b, n_k, h_kv, d]; v [b, n_k, h_kv, dv]; k_rows [b, h, n_q] int64
        b, n_q, h, d = q.shape
        n_k, h_kv, dv = k.shape[1], k.shape[2], v.shape[3]
        g = h // h_kv
        offset = n_k - n_q
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qh = q.permute(0, 2, 1, 3).reshape(b, h_kv, g, n_q, d)
        kh = k.permute(0, 2, 1, 3).contiguous()  # [b, h_kv, n_k, d]
        vh = v.permute(0, 2, 1, 3).contiguous()
        kr = k_rows.reshape(b, h_kv, g, n_q)
        probs = torch.zeros(b, h_kv, g, n_q, kk, dtype=compute, device=q.device)
        index = torch.zeros(b, h_kv, g, n_q, kk, dtype=torch.int32, device=q.device)
        capped = (torch.full((b, h_kv, g, n_q, kk), float("-inf"), dtype=compute, device=q.device)
                  if softcap is not None else None)
        out = torch.zeros(b, h_kv, g, n_q, dv, dtype=compute, device=q.device)
        # Per query row: the score buffer, its mask and topk temporaries (~4 copies of [b, h, n_k])
        # and the gathered V rows with their flat indices ([b, h, kk, dv] + [b, h, kk] int64). The
        # gather matters where n_k is small next to kk * dv.
        rows = chunk_rows(b * h * (n_k * 4 * 4 + kk * (dv * 4 + 8)), n_q, budget, chunk_size)
        kt = kh.to(compute).transpose(-1, -2).contiguous()  # [b, h_kv, d, n_k]
        for q0 in range(0, n_q, rows):
            q1 = min(n_q, q0 + rows)
            scored = chunk_scores(qh, kt, q0, q1, offset, causal, key_padding_mask, scale, softcap, compute,
                                  window)
            if scored is None:
                continue  # every row of this chunk is fully masked: zeros
            k_start, k_end, s = scored
            del scored
            kc = min(kk, k_end - k_start)
            vals, idx = topk_select(s, kr[:, :, :, q0:q1], kc)
            del s
            if k_start:
                idx = idx + k_start
            p = _softmax_rows(vals)
            probs[:, :, :, q0:q1, :kc] = p
            index[:, :, :, q0:q1, :kc] = idx.to(torch.int32)
            if capped is not None:
                capped[:, :, :, q0:q1, :kc] = vals
            vg = _gather_rows(vh, _flat_rows(idx, n_k), idx.shape).to(compute)
            # One bmm over [rows, 1, kk] x [rows, kk, d], on contiguous 3-d views: a broadcasting
            # matmul on the 6-d shapes falls back to a loop of small copies on CPU.
            out[:, :, :, q0:q1] = torch.bmm(p.reshape(-1, 1, kc), vg.reshape(-1, kc, dv)).view(*p.shape[:-1], dv)
        ctx.save_for_backward(q, k, v, probs, index, capped)
        ctx.scale, ctx.softcap, ctx.chunk_size, ctx.budget = scale, softcap, chunk_size, budget
        return out.reshape(b, h, n_q, dv).permute(0, 2, 1, 3).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, index, capped = ctx.saved_tensors
        b, n_q, h, d = q.shape
        n_k, h_kv, dv = k.shape[1], k.shape[2], v.shape[3]
        g = h // h_kv
        kk = probs.shape[-1]
        compute = probs.dtype
        qh = q.permute(0, 2, 1, 3).reshape(b, h_kv, g, n_q, d).to(compute)
        kh = k.permute(0, 2, 1, 3).to(compute).contiguous()
        vh = v.permute(0, 2, 1, 3).to(compute).contiguous()
        do = grad_out.permute(0, 2, 1, 3).reshape(b, h_kv, g, n_q, dv).to(compute)
        dq = torch.zeros_like(qh)
        dk = torch.zeros_like(kh)
        dvh = torch.zeros_like(vh)
        # Gathered K and V rows and the two scatter sources: ~4 copies of [b, h, rows, kk, d].
        rows = chunk_rows(b * h * kk * max(d, dv) * 4 * 4, n_q, ctx.budget, None)
        for q0 in range(0, n_q, rows):
            q1 = min(n_q, q0 + rows)
            p = probs[:, :, :, q0:q1]
            idx = index[:, :, :, q0:q1].long()
            do_c = do[:, :, :, q0:q1]
            flat = _flat_rows(idx, n_k)
            rows_c = p.shape[:-1]
            vg = _gather_rows(vh, flat, idx.shape).view(-1, kk, dv)
            dp = torch.bmm(vg, do_c.reshape(-1, dv, 1)).view(*rows_c, kk)
            del vg
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))
            if ctx.softcap is not None:
                c = capped[:, :, :, q0:q1]
                slope = torch.where(p > 0, 1 - (c / ctx.softcap) ** 2, torch.zeros_like(c))
                ds = ds * slope
            ds = ds * ctx.scale
            kg = _gather_rows(kh, flat, idx.shape).view(-1, kk, d)
            dq[:, :, :, q0:q1] = torch.bmm(ds.reshape(-1, 1, kk), kg).view(*rows_c, d)
            del kg
            _scatter_rows(dk, flat, ds.unsqueeze(-1) * qh[:, :, :, q0:q1].unsqueeze(-2))
            _scatter_rows(dvh, flat, p.unsqueeze(-1) * do_c.unsqueeze(-2))
        dq = dq.reshape(b, h, n_q, d).permute(0, 2, 1, 3).to(q.dtype)
        dk = dk.permute(0, 2, 1, 3).to(k.dtype)
        dvh = dvh.permute(0, 2, 1, 3).to(v.dtype)
        return dq, dk, dvh, None, None, None, None, None, None, None, None, None


def _softmax_rows(vals: torch.Tensor) -> torch.Tensor:
    """Softmax over the kept values; rows with nothing kept give zeros."""
    m = vals.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(vals - m)
    z = e.sum(-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def chunked_topk_attention(q, k, v, k_rows, kk, *, causal, key_padding_mask, scale, softcap,
                           chunk_size=None, memory_budget=DEFAULT_MEMORY_BUDGET, window=None):
    """Functional entry: see ``ChunkedTopKAttention``. ``k_rows`` [b, h, n_q] int64, ``kk`` = its max."""
    return ChunkedTopKAttention.apply(q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap,
                                      chunk_size, memory_budget, window)
