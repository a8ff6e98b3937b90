"""The selection rule shared by every backend, and the resolution of ``k`` to one value per query row.

Rule: row i keeps its k largest *valid* scores, ordering keys by (score descending, key index
ascending), so a tie at the boundary goes to the smaller key index: the project's one ranking rule,
:mod:`tl_plugins.ranking`. ``torch.topk`` alone does not promise that tie-break; the fast path
here takes ``torch.topk``'s values and redoes, with the rule's mask, only the rows where a tie
straddles the boundary.
A row with fewer than k valid keys keeps all of them; a row with none keeps none.

A per-head k spec is a tuple with one entry per query head, each ``int`` (absolute k), ``float`` in
(0, 1] (fraction of the row's valid keys, rounded up, at least 1) or ``None`` (dense head).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from tl_plugins.ranking import keep_mask

KSpec = Union[int, float, Sequence[Union[int, float, None]], torch.Tensor]

# Fractions are rounded up after subtracting this, so 0.1 * 30 gives 3 and not 4.
_FRACTION_EPS = 1e-9


def validate_k_value(value, argument: str = "k", allow_none: bool = False):
    """Check one k entry and return it as ``int``, ``float`` or ``None``; raise naming ``argument``."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{argument}: got None; accepted: an int >= 1 or a fraction in (0, 1]")
    if isinstance(value, bool):
        raise TypeError(f"{argument}: got bool {value!r}; accepted: an int >= 1 or a fraction in (0, 1]")
    if isinstance(value, numbers.Integral):
        if int(value) < 1:
            raise ValueError(f"{argument}: got {value!r}; k must be an int >= 1 or a fraction in (0, 1]")
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        if not math.isfinite(f) or not (0.0 < f <= 1.0):
            raise ValueError(
                f"{argument}: got {value!r}; a float k is a fraction of the valid keys and must lie in "
                "(0, 1]; for an absolute k pass an int >= 1"
            )
        return f
    raise TypeError(
        f"{argument}: got {type(value).__name__} {value!r}; accepted: an int >= 1, a fraction in (0, 1]"
        + (" or None (dense)" if allow_none else "")
    )


def per_head_spec(k_top: KSpec, n_heads: int, argument: str = "k_top") -> tuple:
    """Normalise ``k_top`` to a tuple of ``n_heads`` entries (int, float fraction or None)."""
    if isinstance(k_top, torch.Tensor):
        if k_top.dim() == 0:
            k_top = k_top.item()
        else:
            k_top = k_top.tolist()
    if isinstance(k_top, (list, tuple)):
        if len(k_top) != n_heads:
            raise ValueError(
                f"{argument}: a per-head k needs one entry per query head ({n_heads}), got {len(k_top)}"
            )
        return tuple(validate_k_value(x, f"{argument}[{h}]", allow_none=True) for h, x in enumerate(k_top))
    v = validate_k_value(k_top, argument)
    return (v,) * n_heads


def count_valid(
    n_q: int, n_k: int, causal: bool, key_padding_mask: Optional[torch.Tensor], batch: int, device,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Valid keys per query row, [batch, n_q] int64, from the masks alone (O(batch * n) memory).

    Causal alignment is bottom-right: query i sits at key position ``p = i + n_k - n_q``. ``window``
    (causal only, sliding-window / local attention) keeps keys ``p - window < j <= p``.
    """
    offset = n_k - n_q
    pos = torch.arange(n_q, device=device) + offset
    if key_padding_mask is None:
        if causal:
            row = (pos + 1).clamp(min=0, max=n_k)
            if window is not None:
                row = row.clamp(max=window)
        else:
            row = torch.full((n_q,), n_k, device=device, dtype=torch.long)
        return row.unsqueeze(0).expand(batch, n_q).contiguous()
    pad = key_padding_mask.to(device=device, dtype=torch.long)
    if causal:
        # csum[:, j] = real keys among 0..j-1, so keys lo..p number csum[p + 1] - csum[lo].
        csum = torch.nn.functional.pad(pad.cumsum(-1), (1, 0))
        hi = (pos + 1).clamp(min=0, max=n_k)
        lo = (pos + 1 - window).clamp(min=0, max=n_k) if window is not None else torch.zeros_like(hi)
        return (csum[:, hi] - csum[:, lo]).clamp(min=0)
    return pad.sum(-1, keepdim=True).expand(batch, n_q).contiguous()


def k_per_row(spec: tuple, n_valid: torch.Tensor, n_k: int) -> torch.Tensor:
    """k for every (batch, head, query row), [batch, n_heads, n_q] int64, each in [1, n_k].

    ``n_valid``: [batch, n_q] valid keys per row. Dense heads (None) get ``n_k``; fractions get
    ``ceil(f * n_valid)`` (at least 1).
    """
    rows = []
    for entry in spec:
        if entry is None:
            rows.append(torch.full_like(n_valid, max(n_k, 1)))
        elif isinstance(entry, float):
            k = torch.ceil(n_valid.to(torch.float64) * entry - _FRACTION_EPS).to(torch.long)
            rows.append(k.clamp(min=1, max=max(n_k, 1)))
        else:
            rows.append(torch.full_like(n_valid, min(entry, max(n_k, 1))))
    return torch.stack(rows, dim=1)


def _fraction_keeps_every_key(f: float, n_k: int) -> bool:
    """True when ``ceil(f * n_valid)`` (the rule of ``k_per_row``) equals ``n_valid`` for every
    ``n_valid`` in 1..n_k, so a fraction below 1 still selects every valid key of every row."""
    n = torch.arange(1, max(n_k, 1) + 1, dtype=torch.float64)
    return bool((torch.ceil(n * f - _FRACTION_EPS) >= n).all())


def spec_covers_all(spec: tuple, n_k: int) -> bool:
    """True when every head keeps every valid key in every row (top-k equals dense), for rows of
    up to ``n_k`` keys: then the caller can hand the call to the bit-exact dense path."""
    return all(e is None or (isinstance(e, float) and (e >= 1.0 or _fraction_keeps_every_key(e, n_k)))
               or (isinstance(e, int) and e >= n_k)
               for e in spec)


def topk_keep_mask(scores: torch.Tensor, k_rows: torch.Tensor) -> torch.Tensor:
    """Bool mask [..., n] of the kept keys under the rule above (the project's
    :func:`tl_plugins.ranking.keep_mask`).

    ``scores``: [..., n], invalid keys at -inf. ``k_rows``: [...] int64 >= 1 (broadcastable).
    """
    return keep_mask(scores, k_rows)


def topk_select(scores: torch.Tensor, k_rows: torch.Tensor, kk: int):
    """Values and indices of the kept keys of each row: ([..., kk], [..., kk]).

    ``scores`` [..., n] (invalid keys at -inf, n >= kk >= 1), ``k_rows`` [...] int64. Entries beyond a
    row's k, and invalid keys, come back with value -inf (their index is some in-range key).
    """
    n = scores.shape[-1]
    extra = 1 if kk < n else 0
    # One value past the largest k tells whether a tie straddles a row's boundary, without
    # another pass over the [rows, n] scores.
    vals, idx = torch.topk(scores, kk + extra, dim=-1, sorted=True)
    kr = k_rows.clamp(max=kk)
    tau = vals.gather(-1, (kr - 1).unsqueeze(-1)).squeeze(-1)
    after = vals.gather(-1, kr.clamp(max=kk + extra - 1).unsqueeze(-1)).squeeze(-1)
    ambiguous = (kr < n) & (after == tau) & torch.isfinite(tau)
    if extra:
        vals, idx = vals[..., :kk], idx[..., :kk]
    if bool(ambiguous.any()):
        vals, idx = _resolve_ties(scores, kr, kk, ambiguous, vals, idx)
    beyond = torch.arange(kk, device=scores.device) >= kr.unsqueeze(-1)
    vals = vals.masked_fill(beyond, float("-inf"))
    return vals, idx


def flagged_row_blocks(flags: torch.Tensor, n: int, block_elements: Optional[int] = None):
    """Yield int64 index tensors of the rows (of ``flags.reshape(-1)``) that are flagged, in blocks of
    at most ``block_elements`` scores of ``n`` keys (default: an eighth of all rows' scores), so work
    on rare rows stays a fraction of the score buffer even when many are flagged."""
    rows = flags.reshape(-1).nonzero().squeeze(-1)
    if block_elements is None:
        block_elements = max(n, flags.numel() * n // 8)
    step = max(1, block_elements // max(n, 1))
    for r0 in range(0, rows.numel(), step):
        yield rows[r0:r0 + step]


def _resolve_ties(scores, kr, kk, ambiguous, vals, idx, block_elements: int | None = None):
    """Redo the selection of the rows where a tie straddles the k boundary (``torch.topk`` may have
    kept any of the tied keys), under the rule: only those rows, a block of them at a time.

    Ties are rare in fp32 scores but each one would otherwise cost several [rows, n] temporaries
    (measured: 69 MiB beside a 16 MiB score chunk at n = 4096); in blocks of at most
    ``block_elements`` scores (default: an eighth of ``scores``) the extra memory stays a fraction of
    the score buffer even when many rows tie (bf16, quantised models).
    """
    n = scores.shape[-1]
    flat_s = scores.reshape(-1, n)
    flat_k = kr.reshape(-1)
    vals, idx = vals.reshape(-1, kk).clone(), idx.reshape(-1, kk).clone()
    for r in flagged_row_blocks(ambiguous, n, block_elements):
        sub = flat_s.index_select(0, r)
        keep = topk_keep_mask(sub, flat_k.index_select(0, r))
        v, i = torch.topk(sub.masked_fill_(~keep, float("-inf")), kk, dim=-1, sorted=True)
        del sub, keep
        vals[r], idx[r] = v, i
    return vals.view(*scores.shape[:-1], kk), idx.view(*scores.shape[:-1], kk)


def safe_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax that gives 0 (not NaN) on rows that are all -inf, in the forward and the backward."""
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    z = e.sum(dim, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))
