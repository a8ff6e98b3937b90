"""The project's one ranking rule: the k largest values, ties to the smaller index.

``torch.topk`` returns the right values but, where several entries tie at the k-th value, keeps an
arbitrary subset of them and orders equal values arbitrarily. Every plugin that ranks (top-k
attention's key selection, top-k feed-forward, vocabulary-space top tokens and pairs, the
debugger's tables) uses the functions here instead, so the same input always gives the same
answer on every backend and machine:

- the kept set: entries ordered by (value descending, index ascending), the first k;
- the returned order: the same (value descending, index ascending).

Three shapes of the same rule:

- :func:`top_k` — values and indices of the k best along a dimension (``torch.topk``'s face);
- :func:`keep_mask` — a boolean mask of the kept entries with a k per row, -inf entries never kept
  (attention scores, where -inf marks a masked key);
- :func:`top_k_keyed` — the k best of a flat candidate set whose entries carry explicit integer keys
  (a streamed search merging candidates from many chunks), ties to the smaller key.

All are pure tensor functions: no model, no plugin.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float, Int

__all__ = ["top_k", "keep_mask", "top_k_keyed"]


def top_k(x: Float[torch.Tensor, "... n"], k: int, dim: int = -1
          ) -> tuple[Float[torch.Tensor, "... k"], Int[torch.Tensor, "... k"]]:
    """The ``k`` largest entries of ``x`` along ``dim``, ties to the smaller index.

    Returns ``(values, indices)`` like ``torch.topk(x, k, dim, sorted=True)``, but deterministic:
    among entries equal to the k-th value the smaller indices are kept, and equal values come back
    in ascending index order. ``k`` must lie in ``0..x.shape[dim]``.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: got {type(k).__name__} {k!r}; accepted: an int")
    n = x.shape[dim] if x.dim() else 1
    if not 0 <= k <= n:
        raise ValueError(f"k: got {k}; accepted: 0..{n} (the size of dimension {dim})")
    xs = x.movedim(dim, -1) if x.dim() else x.reshape(1)
    lead = xs.shape[:-1]
    flat = xs.reshape(math.prod(lead), n)
    extra = 1 if k < n else 0
    v, i = torch.topk(flat, k + extra, dim=-1, sorted=True)
    # a tie straddles the boundary where the value after the k-th equals it
    ambiguous = (v[:, k - 1] == v[:, k]).nonzero().flatten() if extra and k else None
    v, i = v[:, :k], i[:, :k]
    if ambiguous is not None and ambiguous.numel():
        v, i = v.clone(), i.clone()
        sub = flat.index_select(0, ambiguous)                   # [n_ambiguous, n]
        kept = _kept_indices(sub, v[ambiguous][:, -1:], k)      # [n_ambiguous, k], ascending
        i[ambiguous], v[ambiguous] = kept, sub.gather(-1, kept)
    v, i = _order(v, i)
    v, i = v.reshape(*lead, k), i.reshape(*lead, k)
    if not x.dim():
        return v.reshape(()) if k else v.reshape(0), i.reshape(()) if k else i.reshape(0)
    return v.movedim(-1, dim), i.movedim(-1, dim)


def _kept_indices(rows: torch.Tensor, tau: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the kept entries of ``rows`` [r, n] whose k-th value is ``tau`` [r, 1]."""
    n = rows.shape[-1]
    greater = rows > tau
    equal = rows == tau
    rank = equal.cumsum(-1)
    keep = greater | (equal & (rank <= k - greater.sum(-1, keepdim=True)))
    pos = torch.arange(n, device=rows.device).expand_as(rows)
    return torch.where(keep, pos, n).sort(dim=-1).values[..., :k]


def _order(v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder selected entries by (value descending, index ascending)."""
    if v.shape[-1] <= 1:
        return v, i
    o = torch.argsort(i, dim=-1)
    v, i = v.gather(-1, o), i.gather(-1, o)
    o = torch.sort(v, dim=-1, descending=True, stable=True).indices
    return v.gather(-1, o), i.gather(-1, o)


def keep_mask(scores: Float[torch.Tensor, "... n"], k_rows: Int[torch.Tensor, "..."]
              ) -> Bool[torch.Tensor, "... n"]:
    """Boolean mask of the entries each row keeps: its ``k_rows`` largest finite-or-+inf entries.

    ``scores``: [..., n], entries at -inf are invalid and never kept (a row with fewer than k valid
    entries keeps all its valid ones). ``k_rows``: int64, broadcastable to ``scores.shape[:-1]``,
    each >= 1 (values above n mean every entry).
    """
    n = scores.shape[-1]
    k_rows = torch.as_tensor(k_rows, device=scores.device).expand(scores.shape[:-1]).clamp(max=n)
    if n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kk = int(k_rows.max().item()) if k_rows.numel() else 1
    vals = torch.topk(scores, max(1, kk), dim=-1, sorted=True).values
    tau = vals.gather(-1, (k_rows - 1).clamp(min=0).unsqueeze(-1))
    greater = scores > tau
    equal = scores == tau
    n_greater = greater.sum(-1, keepdim=True)
    rank = equal.cumsum(-1, dtype=torch.int32)
    keep = greater | (equal & (rank <= k_rows.unsqueeze(-1) - n_greater))
    return keep & (scores > float("-inf"))


def top_k_keyed(values: Float[torch.Tensor, " n"], keys: Int[torch.Tensor, " n"], k: int
                ) -> tuple[Float[torch.Tensor, " k"], Int[torch.Tensor, " k"]]:
    """The ``k`` best of a flat candidate set, ordered by (value descending, key ascending).

    ``values`` [n] and ``keys`` [n] (distinct integer keys, e.g. flat ``row * n_cols + col``) come
    from anywhere (several chunks concatenated); fewer than ``k`` candidates returns all of them.
    """
    n = values.numel()
    if n > k:
        # only the candidates at or above the k-th value can be kept
        kth = torch.topk(values, k).values[-1] if k else values.max()
        cand = (values >= kth).nonzero().flatten()
        values, keys = values[cand], keys[cand]
    o = torch.argsort(keys)
    values, keys = values[o], keys[o]
    v, i = top_k(values, min(k, values.numel()))
    return v, keys[i]
