"""Pure tensor functions under the debugger (no model): the frozen-scale final norm, sub-update
scores and direct effects, two-sided exact top-k of a value matrix in vocabulary space, spherical
k-means. Everything above (trace.py, index.py) feeds tensors in and reads tensors out.

Shapes: ``V`` value vectors [N, d_model]; ``B`` a vocabulary basis [d_model, d_vocab] (a token's
score for a written vector ``v`` is ``v @ B``); ``coef`` coefficients [d_mlp]; ``W_out`` [d_mlp, d_model].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tl_embedspace.factored_topk import chunk_rows_for
from tl_plugins.ranking import top_k

NORM_KINDS = ("rms", "ln", "none")


@dataclass(frozen=True)
class FrozenNorm:
    """The final norm at one position with its scale frozen: ``L(u) = w * P(u) / sigma``.

    ``P`` centres a vector for LayerNorm (identity for RMSNorm), ``w`` is the norm's weight (ones
    when it is folded into W_U or absent) and ``sigma`` is the scale the norm computed for the
    *final* residual at that position. Because ``L`` is linear, the logit of a token splits exactly
    into the sum of every component's ``L(component) . W_U[:, t]`` (plus the norm's bias term):
    that is the direct effect used throughout (the standard direct-logit-attribution convention).
    """

    kind: str
    sigma: float
    w: Optional[torch.Tensor]

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """``P(u) * w`` (no division by sigma): the direction of the frozen readout."""
        if self.kind == "ln":
            u = u - u.mean(-1, keepdim=True)
        return u if self.w is None else u * self.w

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        return self.project(u) / self.sigma


def norm_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """sigma of ``x [..., d]`` for RMSNorm (``sqrt(mean x^2 + eps)``), LayerNorm (``sqrt(var x + eps)``)
    or no norm (1)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind: got {kind!r}; accepted: {', '.join(NORM_KINDS)}")
    if kind == "none":
        return torch.ones(x.shape[:-1], dtype=x.dtype)
    if kind == "ln":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + eps).sqrt()


def token_directions(W_U: torch.Tensor, ids: torch.Tensor, norm: FrozenNorm,
                     weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The residual direction ``d`` [d_model] whose dot product with a vector is its direct effect on
    ``sum_j weights_j * logit(ids_j)`` through the frozen norm (``weights`` default: all ones)."""
    cols = W_U[:, ids]                                     # [d, T]
    if weights is None:
        weights = torch.ones(cols.shape[1], dtype=cols.dtype)
    d = cols @ weights.to(cols.dtype)
    if norm.w is not None:
        d = d * norm.w
    if norm.kind == "ln":  # P is symmetric: P(u) . d == u . P(d)
        d = d - d.mean()
    return d / norm.sigma


def sub_update_scores(coef: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The original ranking: ``|m_i| * ||v_i||``."""
    return coef.abs() * norms


def direct_effects(coef: torch.Tensor, value_dots: torch.Tensor) -> torch.Tensor:
    """``m_i * (v_i . d)``: each sub-update's direct effect, from ``value_dots = W_out @ d``."""
    return coef * value_dots


def ranked(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values``, ties to the smaller index (deterministic)."""
    return top_k(values.flatten(), min(int(k), values.numel()))[1]


def rank_of(values: torch.Tensor) -> torch.Tensor:
    """1-based rank of every entry of ``values`` (largest first, ties to the smaller index)."""
    order = torch.argsort(-values.double(), stable=True)
    r = torch.empty_like(order)
    r[order] = torch.arange(1, values.numel() + 1)
    return r


def update_shares(coef: torch.Tensor, W_out: torch.Tensor, top: torch.Tensor,
                  value_dots: torch.Tensor) -> dict:
    """How much of the FFN update the sub-updates ``top`` explain.

    ``norm_share``: ||sum_top m_i v_i|| / ||sum_all m_i v_i||; ``explained``: 1 - ||update - top part||^2
    / ||update||^2 (the fraction of the update's squared norm the top part accounts for, may be < 0);
    ``direct_share``: top part's direct effect / the whole update's direct effect."""
    update = coef @ W_out
    part = coef[top] @ W_out[top]
    un = float(update.norm())
    de_all = float((coef * value_dots).sum())
    de_top = float((coef[top] * value_dots[top]).sum())
    return {
        "ffn_norm": un,
        "topk_norm_share": float(part.norm()) / un if un > 0 else float("nan"),
        "topk_explained": 1.0 - float((update - part).pow(2).sum()) / un**2 if un > 0 else float("nan"),
        "ffn_direct_effect": de_all,
        "topk_direct_share": de_top / de_all if de_all != 0 else float("nan"),
    }


def two_sided_topk(V: torch.Tensor, B: torch.Tensor, n: int, *, budget_bytes: int = 128 * 2**20,
                   progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-``n`` and bottom-``n`` tokens of every row of ``V @ B`` from one product per chunk.

    Row chunks are sized by the project's ``chunk_rows_for`` (a chunk of rows times the whole
    vocabulary stays inside ``budget_bytes``); where more candidates tie at the n-th value than fit,
    the project's ranking rule (:func:`tl_plugins.ranking.top_k`) keeps the smaller token ids, and each
    row is ordered by (value desc, id asc) (bottom: value asc, id asc), as ``tl_embedspace.factored_topk`` does.
    Returns ``(top_vals, top_ids, bot_vals, bot_ids)``, each [N, n]."""
    N, m = V.shape[0], B.shape[1]
    n = min(int(n), m)
    chunk = chunk_rows_for(m, B.element_size(), budget_bytes)
    out = [torch.empty(N, n, dtype=B.dtype), torch.empty(N, n, dtype=torch.long),
           torch.empty(N, n, dtype=B.dtype), torch.empty(N, n, dtype=torch.long)]
    for s in range(0, N, chunk):
        C = V[s:s + chunk].to(B.dtype) @ B
        for side in (0, 1):
            if side:
                C.neg_()
            v, j = top_k(C, n, dim=1)
            out[2 * side][s:s + chunk] = -v if side else v
            out[2 * side + 1][s:s + chunk] = j
        del C
        if progress is not None:
            progress(min(chunk, N - s))
    return out[0], out[1], out[2], out[3]


def score_moments(V: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over the vocabulary of every row's scores ``V @ B``, exactly,
    without forming the product: mean = v . mu, E[s^2] = v^T (B B^T / m) v."""
    Bd = B.double()
    mu = Bd.mean(1)
    G = (Bd @ Bd.T) / Bd.shape[1]
    Vd = V.double()
    mean = Vd @ mu
    second = ((Vd @ G) * Vd).sum(1)
    std = (second - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def gram_root(B: torch.Tensor) -> torch.Tensor:
    """``(B B^T)^{1/2}`` [d, d]: ``v @ root`` has the same dot products as ``v @ B`` (cosines in the
    vocabulary space without the vocabulary)."""
    Bd = B.double()
    E, Q = torch.linalg.eigh(Bd @ Bd.T)
    return ((Q * E.clamp_min(0).sqrt()) @ Q.T).float()


def spherical_kmeans(X: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0,
                     chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine) of the rows of ``X`` [N, d]: O(N k d) per iteration, never N x N.
    k-means++ seeding from a seeded generator. Returns ``(labels [N], centroids [k, d] unit,
    cosine to own centroid [N])``."""
    N = X.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"n_clusters: got {k!r}; accepted: an int in [1, {N}]")
    g = torch.Generator().manual_seed(int(seed))
    Xn = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cent = [Xn[int(torch.randint(N, (1,), generator=g))]]
    best = torch.full((N,), -1.0)
    for _ in range(1, k):
        best = torch.maximum(best, Xn @ cent[-1])
        w = (1 - best).clamp_min(0) + 1e-12
        cent.append(Xn[int(torch.multinomial(w, 1, generator=g))])
    C = torch.stack(cent)
    labels = torch.zeros(N, dtype=torch.long)
    sims = torch.zeros(N)
    for _ in range(iters):
        for s in range(0, N, chunk):
            S = Xn[s:s + chunk] @ C.T
            sims[s:s + chunk], labels[s:s + chunk] = S.max(1)
        new = torch.zeros_like(C).index_add_(0, labels, Xn)
        empty = new.norm(dim=1) < 1e-12
        if empty.any():  # re-seed an empty cluster at the worst-fitting point
            worst = torch.argsort(sims)[: int(empty.sum())]
            new[empty] = Xn[worst]
        new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if torch.allclose(new, C, atol=1e-6):
            C = new
            break
        C = new
    for s in range(0, N, chunk):
        S = Xn[s:s + chunk] @ C.T
        sims[s:s + chunk], labels[s:s + chunk] = S.max(1)
    return labels, C, sims
