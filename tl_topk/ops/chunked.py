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

from tl_topk.ops.dense import soft_cap, valid_mask
from tl_topk.ops.selection import topk_select

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes of transient buffers per chunk


def chunk_rows(per_row_bytes: int, n_rows: int, budget: int, chunk_size: Optional[int]) -> int:
    """Query rows per chunk: ``chunk_size`` if given, else as many as fit ``budget``."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n_rows))
    return max(1, min(n_rows, budget // max(1, per_row_bytes)))


# Named ranges: a torch.profiler trace (scripts/topk_profile.py) sums the time of each phase.
_phase = torch.profiler.record_function


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
    soft_cap(s, softcap, inplace=True)
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
    """z = top-k attention (see ``tl_topk.topk_attention``) with O(n k) saved state.

    Work is laid out in planes, one per (batch, K/V head): a plane's rows are its query positions
    times the group's query heads (row ``i * g + j`` is query ``i`` of head ``kv * g + j``), so a chunk
    of rows is one contiguous block, every matmul is a plain 2-d one against the plane's K (no K/V
    copies in the forward), and ``torch.topk`` writes straight into the saved tensors. The per-chunk
    loop is a handful of ATen calls (scores, mask, topk, a two-call tie probe); the softmax and the
    beyond-k masking run once over all rows, the P @ V gathers in chunks of their own size. On a
    machine shared with other jobs every ATen call waits for its threads, so the count of calls, not
    only the flops, sets the time.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap, chunk_size, budget,
                window=None):
        # q [b, n_q, h, d]; k [b, n_k, h_kv, d]; v [b, n_k, h_kv, dv]; k_rows [b, h, n_q] int64
        b, n_q, h, d = q.shape
        n_k, h_kv, dv = k.shape[1], k.shape[2], v.shape[3]
        g = h // h_kv
        n_rows = n_q * g
        offset = n_k - n_q
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        dev = q.device
        with _phase("topk.fwd.setup"):
            # q scaled once, in plane layout [b, h_kv, n_q, g, d] (scaling q is O(n d), the scores O(n^2)).
            qp = torch.empty(b, h_kv, n_q, g, d, dtype=compute, device=dev)
            torch.mul(q.view(b, n_q, h_kv, g, d).permute(0, 2, 1, 3, 4), scale, out=qp)
            qp = qp.view(b * h_kv, n_rows, d)
            # K transposed once, [b, h_kv, d, n_k]: the scores are then a plain (NN) gemm whose columns all
            # see the same arithmetic, so identical keys give identical scores (exact ties stay ties).
            kt = k.permute(0, 2, 3, 1).to(compute).contiguous()
            vc_ = v.to(compute)
            kr = k_rows.view(b, h_kv, g, n_q).transpose(-1, -2).reshape(b * h_kv, n_rows).clamp(max=kk)
            kk1 = min(kk + 1, n_k)  # one value past the largest k tells whether a tie straddles it
            vals = torch.full((b * h_kv, n_rows, kk1), float("-inf"), dtype=compute, device=dev)
            index = torch.zeros(b * h_kv, n_rows, kk, dtype=torch.int32, device=dev)
            # Rows from first_full[p] on all keep kk keys: their tie probe is two calls on views.
            short = kr < kk
            any_short = bool(short.any())
            if any_short:
                last = torch.where(short, torch.arange(n_rows, device=dev), -1).amax(-1)
                first_full = (last + 1).tolist()
            else:
                first_full = [0] * (b * h_kv)
            pad_inv = (~key_padding_mask.to(device=dev, dtype=torch.bool)) if key_padding_mask is not None else None
        # Query positions per chunk: the score buffer is a quarter of the budget (topk's own work and
        # the caller's tensors share the rest), reused by every chunk (no page faults per chunk).
        c_q = chunk_rows(g * n_k * 4 * 4, n_q, budget, chunk_size)
        buf = torch.empty(c_q * g * n_k, dtype=compute, device=dev)
        ibuf = torch.empty(c_q * g * kk1, dtype=torch.int64, device=dev)  # topk's indices, then int32
        tri = (torch.ones(c_q, c_q, dtype=torch.bool, device=dev).triu_(1).unsqueeze(1)
               if causal and window is None else None)
        for p in range(b * h_kv):
            bi, hk = divmod(p, h_kv)
            kt_p = kt[bi, hk]  # [d, n_k]
            for q0 in range(0, n_q, c_q):
                q1 = min(n_q, q0 + c_q)
                c = q1 - q0
                k_end = min(n_k, q1 + offset) if causal else n_k
                k_start = max(0, q0 + offset - window + 1) if (causal and window is not None) else 0
                if k_end <= k_start:
                    continue  # every row of this chunk is fully masked: zeros
                kw = k_end - k_start
                r0, r1 = q0 * g, q1 * g
                with _phase("topk.fwd.scores"):
                    s = buf[:c * g * kw].view(c * g, kw)
                    torch.mm(qp[p, r0:r1], kt_p[:, k_start:k_end], out=s)
                    soft_cap(s, softcap, inplace=True)
                    s3 = s.view(c, g, kw)
                    if causal:
                        lo = q0 + offset
                        if tri is not None and lo >= 0:
                            # keys lo.. are the chunk's diagonal band: key lo + j' is after query q0 + i iff j' > i
                            s3[:, :, lo:].masked_fill_(tri[:c, :, :k_end - lo], float("-inf"))
                        else:
                            band = valid_mask(torch.arange(q0, q1, device=dev) + offset, k_end, True, None, window)
                            s3.masked_fill_(~band[0, 0, :, k_start:k_end].unsqueeze(1), float("-inf"))
                    if pad_inv is not None:
                        s3.masked_fill_(pad_inv[bi, k_start:k_end], float("-inf"))
                with _phase("topk.fwd.select"):
                    cnt = min(kk1, kw)
                    v_out, i_out = vals[p, r0:r1, :cnt], ibuf[:c * g * cnt].view(c * g, cnt)
                    torch.topk(s, cnt, dim=-1, sorted=True, out=(v_out, i_out))
                    if _boundary_tie(v_out, kr[p, r0:r1], kk, cnt, kw, r0 >= first_full[p]):
                        # The rule's own path (tl_topk.ops.selection), on this chunk's scores.
                        kc = min(kk, kw)
                        tv, ti = topk_select(s, kr[p, r0:r1], kc)
                        v_out[:, :kc], i_out[:, :kc] = tv, ti
                    if k_start:
                        i_out += k_start
                    index[p, r0:r1, :min(cnt, kk)] = i_out[:, :kk]
        del buf, ibuf
        with _phase("topk.fwd.softmax"):
            probs = vals[..., :kk]
            if any_short:  # entries beyond a row's k
                probs.masked_fill_(torch.arange(kk, device=dev) >= kr.unsqueeze(-1), float("-inf"))
            capped = probs.clone() if softcap is not None else None
            # Sorted descending: column 0 is the row max; -inf (a row with nothing kept) -> finfo.min.
            m = probs[..., :1].clamp(min=torch.finfo(compute).min)
            probs.sub_(m).exp_()
            probs.div_(probs.sum(-1, keepdim=True).clamp_(min=torch.finfo(compute).tiny))
        with _phase("topk.fwd.pv"):
            out = torch.empty(b * h_kv, n_rows, dv, dtype=compute, device=dev)
            step = max(1, min(n_rows, budget // max(1, 4 * kk * dv * 4)))  # gathered V rows: a quarter of it
            for p in range(b * h_kv):
                bi, hk = divmod(p, h_kv)
                v_p = vc_[bi, :, hk]
                for r0 in range(0, n_rows, step):
                    r1 = min(n_rows, r0 + step)
                    vg = v_p.index_select(0, index[p, r0:r1].reshape(-1)).view(r1 - r0, kk, dv)
                    torch.bmm(probs[p, r0:r1].unsqueeze(1), vg, out=out[p, r0:r1].unsqueeze(1))
                    del vg
        ctx.save_for_backward(q, k, v, probs, index, capped)
        ctx.scale, ctx.softcap, ctx.budget = scale, softcap, budget
        out = out.view(b, h_kv, n_q, g, dv).permute(0, 2, 1, 3, 4).reshape(b, n_q, h, dv)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, index, capped = ctx.saved_tensors
        b, n_q, h, d = q.shape
        n_k, h_kv, dv = k.shape[1], k.shape[2], v.shape[3]
        g = h // h_kv
        n_rows = n_q * g
        kk = probs.shape[-1]
        compute = probs.dtype
        dev = q.device
        scale = ctx.scale
        with _phase("topk.bwd.setup"):
            # K and V side by side, [b * h_kv, n_k, d + dv]: one gather and one scatter-add per chunk.
            kv = torch.empty(b, h_kv, n_k, d + dv, dtype=compute, device=dev)
            kv[..., :d] = k.permute(0, 2, 1, 3)
            kv[..., d:] = v.permute(0, 2, 1, 3)
            kv = kv.view(b * h_kv, n_k, d + dv)
            # q and dO stay in their own layout: a chunk of query positions of one plane is [c, g, d].
            q5 = q.to(compute).view(b, n_q, h_kv, g, d)
            do5 = grad_out.to(compute).view(b, n_q, h_kv, g, dv)
            dq = torch.empty(b * h_kv, n_rows, d, dtype=compute, device=dev)
            dkv = torch.zeros_like(kv)
            slope = None
            if ctx.softcap is not None:
                slope = torch.where(probs > 0, 1 - (capped / ctx.softcap) ** 2, torch.zeros_like(capped))
        # Query positions per chunk: the gathered [rows, kk, d + dv] K/V rows and the scatter source of
        # that size, together a quarter of the budget.
        step = max(1, min(n_q, ctx.budget // max(1, g * kk * (d + dv) * 4 * 2 * 4)))
        src = torch.empty(step * g * kk * (d + dv), dtype=compute, device=dev)
        for p in range(b * h_kv):
            bi, hk = divmod(p, h_kv)
            for i0 in range(0, n_q, step):
                i1 = min(n_q, i0 + step)
                ci = i1 - i0
                r0, r1 = i0 * g, i1 * g
                c = r1 - r0
                ix = index[p, r0:r1].reshape(-1)
                pr = probs[p, r0:r1]
                do_c = do5[bi, i0:i1, hk].reshape(c, dv)
                with _phase("topk.bwd.gather"):
                    kvg = kv[p].index_select(0, ix).view(c, kk, d + dv)
                with _phase("topk.bwd.dp_softmax"):
                    dp = torch.bmm(kvg[..., d:], do_c.unsqueeze(-1)).squeeze(-1)  # [c, kk]
                    t = torch.bmm(pr.unsqueeze(1), dp.unsqueeze(-1)).squeeze(-1)  # [c, 1]
                    ds = dp.sub_(t).mul_(pr)
                    if slope is not None:
                        ds.mul_(slope[p, r0:r1])
                with _phase("topk.bwd.dq"):
                    torch.bmm(ds.unsqueeze(1), kvg[..., :d], out=dq[p, r0:r1].unsqueeze(1))
                del kvg
                with _phase("topk.bwd.scatter"):
                    sc = src[:c * kk * (d + dv)].view(c, kk, d + dv)
                    # dk_j += ds_ij q_i (scale applied once at the end), dv_j += p_ij dO_i
                    torch.mul(ds.view(ci, g, kk, 1), q5[bi, i0:i1, hk].unsqueeze(2),
                              out=sc[..., :d].view(ci, g, kk, d))
                    torch.mul(pr.unsqueeze(-1), do_c.unsqueeze(1), out=sc[..., d:])
                    # index_add_ with int32 indices: measured 4-6x faster on CPU than index_put_(accumulate=True)
                    # (and 10x faster than index_add_ with int64 indices), also when a third of the entries
                    # hit one key (an attention sink); deterministic on CPU, equal to index_put_'s sums.
                    dkv[p].index_add_(0, ix, sc.view(-1, d + dv))
        del src
        dq.mul_(scale)
        dkv[..., :d].mul_(scale)
        dq = dq.view(b, h_kv, n_q, g, d).permute(0, 2, 1, 3, 4).reshape(b, n_q, h, d).to(q.dtype)
        dkv = dkv.view(b, h_kv, n_k, d + dv).permute(0, 2, 1, 3)
        dk = dkv[..., :d].to(k.dtype)
        dvh = dkv[..., d:].to(v.dtype)
        return dq, dk, dvh, None, None, None, None, None, None, None, None, None


def _boundary_tie(vals: torch.Tensor, kr: torch.Tensor, kk: int, cnt: int, kw: int, full: bool) -> bool:
    """Whether some row of a chunk has a tie straddling its k boundary (``torch.topk`` may then have
    kept any of the tied keys). ``vals`` [rows, cnt] sorted descending; ``kr`` [rows] each row's k
    (<= kk); ``full``: every row's k is kk. Two ATen calls on views for full chunks."""
    if full:
        if cnt <= kk:
            return False  # the chunk sees at most kk keys: every row keeps all its valid keys
        tau, after = vals[:, kk - 1], vals[:, kk]
        return bool(((after == tau) & (tau > float("-inf"))).any())
    # Only rows that see more keys than their k can tie at the boundary; for them kr <= cnt - 1.
    kr1 = kr.unsqueeze(-1)
    tau = vals.gather(-1, (kr1 - 1).clamp(max=cnt - 1))
    after = vals.gather(-1, kr1.clamp(max=cnt - 1))
    return bool(((after == tau) & (tau > float("-inf")) & (kr1 < kw)).any())


def chunked_topk_attention(q, k, v, k_rows, kk, *, causal, key_padding_mask, scale, softcap,
                           chunk_size=None, memory_budget=DEFAULT_MEMORY_BUDGET, window=None):
    """Functional entry: see ``ChunkedTopKAttention``. ``k_rows`` [b, h, n_q] int64, ``kk`` = its max."""
    return ChunkedTopKAttention.apply(q, k, v, k_rows, kk, causal, key_padding_mask, scale, softcap,
                                      chunk_size, memory_budget, window)
