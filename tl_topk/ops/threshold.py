"""Pass 1 of the threshold form of top-k attention: one boundary per query row, in linear memory.

Top-k attention equals dense attention with one extra mask per row: keep key j when its score is
above the row's boundary. With ties the boundary needs the key index too, so each row gets three
numbers and the kept set is

    { j : s_j > lo }  united with  { j : s_j == tie and j <= tie_idx }

* no tie at the boundary: ``lo`` lies strictly between the k-th and the (k+1)-th largest score
  (their midpoint when it is representable), ``tie`` is NaN (never equal), ``tie_idx`` is -1;
* a tie straddles the boundary (k-th == (k+1)-th): ``lo`` = ``tie`` = that score and ``tie_idx`` is
  the index of the last tied key the rule keeps (ties go to the smaller key index);
* fewer than k valid keys (or none): ``lo`` = -inf, which keeps every valid key.

The midpoint makes the boundary robust to a second pass that recomputes the scores in another
order (FlexAttention, a fused GPU kernel): a key flips only if rounding moves it across half the
gap between the k-th and (k+1)-th score.
"""

from __future__ import annotations

import torch

from tl_topk.ops.chunked import DEFAULT_MEMORY_BUDGET, chunk_rows, chunk_scores
from tl_topk.ops.selection import flagged_row_blocks


@torch.no_grad()
def row_thresholds(q, k, k_rows, kk, *, causal, key_padding_mask, scale, softcap,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, window=None):
    """Boundaries ``(lo, tie, tie_idx)`` of every query row, each [batch, n_heads, q_pos].

    Args:
        q: [batch, q_pos, n_heads, d_head]; k: [batch, k_pos, n_kv_heads, d_head] (grouped-query
            attention without repeating K).
        k_rows: [batch, n_heads, q_pos] int64, each row's k (>= 1); ``kk`` = its maximum.
        causal, key_padding_mask, scale, softcap, window: as in ``tl_topk.topk_attention``.
        memory_budget: bytes of transient score buffers per query chunk.

    Returns:
        lo, tie: float32 (float64 for float64 inputs); tie_idx: int32.
    """
    b, n_q, h, d = q.shape
    n_k, h_kv = k.shape[1], k.shape[2]
    g = h // h_kv
    offset = n_k - n_q
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.detach().permute(0, 2, 1, 3).reshape(b, h_kv, g, n_q, d)
    kt = k.detach().permute(0, 2, 3, 1).to(compute).contiguous()  # [b, h_kv, d, n_k]
    kr = k_rows.reshape(b, h_kv, g, n_q)
    lo = torch.full((b, h_kv, g, n_q), float("-inf"), dtype=compute, device=q.device)
    tie = torch.full_like(lo, float("nan"))
    tie_idx = torch.full((b, h_kv, g, n_q), -1, dtype=torch.int32, device=q.device)
    # The score buffer and topk's temporaries: ~3 copies of [b, h, n_k] per query row.
    rows = chunk_rows(b * h * n_k * 4 * 3, n_q, memory_budget, None)
    for q0 in range(0, n_q, rows):
        q1 = min(n_q, q0 + rows)
        scored = chunk_scores(qh, kt, q0, q1, offset, causal, key_padding_mask, scale, softcap, compute, window)
        if scored is None:
            continue  # no row of the chunk sees a key: lo = -inf keeps nothing, as all are -inf
        k_start, k_end, s = scored
        del scored
        krc = kr[:, :, :, q0:q1]
        width = min(kk + 1, k_end - k_start)
        top = torch.topk(s, width, dim=-1, sorted=True).values
        ninf = torch.full_like(top[..., 0], float("-inf"))
        kth = torch.where(krc <= width, top.gather(-1, (krc - 1).clamp(max=width - 1).unsqueeze(-1)).squeeze(-1), ninf)
        nxt = torch.where(krc < width, top.gather(-1, krc.clamp(max=width - 1).unsqueeze(-1)).squeeze(-1), ninf)
        del top
        mid = kth / 2 + nxt / 2
        # Strictly between nxt and kth: the midpoint unless it rounds onto kth (adjacent floats).
        gap_lo = torch.where(mid < kth, mid, nxt)
        tied = (nxt == kth) & torch.isfinite(kth)
        c_lo = torch.where(torch.isfinite(nxt) & ~tied, gap_lo, torch.where(tied, kth, ninf))
        lo[:, :, :, q0:q1] = c_lo
        if bool(tied.any()):
            tie[:, :, :, q0:q1] = torch.where(tied, kth, float("nan"))
            t_idx = _tie_indices(s, kth, krc, tied)
            tie_idx[:, :, :, q0:q1] = torch.where(tied, t_idx + k_start, t_idx)
        del s
    return (lo.reshape(b, h, n_q), tie.reshape(b, h, n_q), tie_idx.reshape(b, h, n_q))


def _tie_indices(s, kth, k_rows, tied, block_elements: int | None = None):
    """int32 shaped like ``tied``: for tied rows, the index (within ``s``) of the r-th key equal to ``kth`` in
    index order, where r = k - (keys strictly above ``kth``); -1 elsewhere. A block of rows at a time."""
    n = s.shape[-1]
    flat_s = s.reshape(-1, n)
    t_idx = torch.full(tied.shape, -1, dtype=torch.int32, device=s.device).reshape(-1)
    kth_f, kr_f = kth.reshape(-1), k_rows.reshape(-1)
    for r in flagged_row_blocks(tied, n, block_elements):
        sub = flat_s.index_select(0, r)
        t = kth_f.index_select(0, r).unsqueeze(-1)
        need = kr_f.index_select(0, r) - (sub > t).sum(-1)  # tied keys the row still takes, >= 1
        reached = (sub == t).cumsum(-1, dtype=torch.int32) >= need.unsqueeze(-1)
        t_idx[r] = reached.to(torch.int8).argmax(-1).to(torch.int32)  # first position reaching it
    return t_idx.view(tied.shape)


def keep_from_thresholds(scores: torch.Tensor, lo, tie, tie_idx) -> torch.Tensor:
    """Bool [..., n_k] of kept keys from a score row block [..., n_k] and its boundaries [...]
    (the rule the second pass applies; the reference for tests)."""
    j = torch.arange(scores.shape[-1], device=scores.device)
    return (scores > lo.unsqueeze(-1)) | ((scores == tie.unsqueeze(-1)) & (j <= tie_idx.unsqueeze(-1)))
