"""Pure tensor metrics comparing in-context learning (ICL) with fine-tuning (FT) against zero-shot (ZSL).

No model here: every function takes tensors and returns tensors or small dataclasses, so each can be
tested alone. Conventions: the last dimension is the vector compared (``d_model`` for attention
outputs, query tokens for attention scores); leading dimensions are kept ([example, layer] or
[example, layer, head]).

Zero updates (``h_ICL == h_ZSL`` or ``h_FT == h_ZSL``) have no direction: the cosine is NaN, never 0,
and :func:`nan_mean` reports how many there were so they cannot hide inside an average.

Metrics (Dai et al. 2023; Deutch et al. 2024):
- SimAOU       cos(h_ICL - h_ZSL, h_FT - h_ZSL) on attention outputs ("raw").
- SimAOU_norm  the same after L2-normalising each h (what both original codes did). For orthogonal
               updates of size sqrt(3)|h| it gives exactly 0.25 instead of 0 (see the tests).
- SimAM        cos(m_ICL, m_ZSL) (before FT) and cos(m_ICL, m_FT) (after FT) on pre-softmax scores
               of the recorded position over the query tokens, per head.
- SimAM_delta  cos(m_ICL - m_ZSL, m_FT - m_ZSL): without the shared m_ZSL term.
- Rec2FTP      P(ICL right | FT right, ZSL wrong), with its chance baseline P(ICL right | ZSL wrong).
- Kendall tau  (tau-b) between two score vectors, batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

# -- cosine with NaN for zero vectors ---------------------------------------------------------------

def cosine(a: Float[torch.Tensor, "... d"], b: Float[torch.Tensor, "... d"], *, eps: float = 0.0
           ) -> Float[torch.Tensor, "..."]:
    """Cosine similarity over the last dimension; NaN where either vector has norm <= ``eps``.

    a, b: [..., d] (broadcastable) -> [...]. Computed in float64 so that tiny updates are not
    rounded to a different direction.
    """
    a = a.double()
    b = b.double()
    na = a.norm(dim=-1)
    nb = b.norm(dim=-1)
    dot = (a * b).sum(-1)
    out = dot / (na * nb)
    zero = (na <= eps) | (nb <= eps)
    return torch.where(zero, torch.full_like(out, math.nan), out)


def _unit(h: torch.Tensor) -> torch.Tensor:
    n = h.double().norm(dim=-1, keepdim=True)
    return torch.where(n > 0, h.double() / n, torch.zeros_like(h, dtype=torch.float64))


# -- SimAOU -----------------------------------------------------------------------------------------

def simaou(h_icl: Float[torch.Tensor, "... d_model"], h_zsl: Float[torch.Tensor, "... d_model"],
           h_ft: Float[torch.Tensor, "... d_model"], *, normalise: bool = False) -> Float[torch.Tensor, "..."]:
    """Similarity of attention-output updates: cos(h_ICL - h_ZSL, h_FT - h_ZSL).

    h_*: [..., d_model] -> [...]. ``normalise=True`` L2-normalises every h first (SimAOU_norm, the
    original codes' variant). NaN where an update is exactly zero.
    """
    same_shape(h_icl=h_icl, h_zsl=h_zsl, h_ft=h_ft)
    if normalise:
        h_icl, h_zsl, h_ft = _unit(h_icl), _unit(h_zsl), _unit(h_ft)
    return cosine(h_icl - h_zsl, h_ft - h_zsl)


# -- SimAM ------------------------------------------------------------------------------------------

def simam(m_a: Float[torch.Tensor, "... head_index q_tokens"], m_b: Float[torch.Tensor, "... head_index q_tokens"]
          ) -> Float[torch.Tensor, "... head_index"]:
    """Cosine between attention-score maps over the query tokens: [..., head_index, q_tokens] -> [..., head_index].

    Before FT: ``simam(m_icl, m_zsl)``; after FT: ``simam(m_icl, m_ft)``.
    """
    same_shape(m_a=m_a, m_b=m_b)
    return cosine(m_a, m_b)


def simam_delta(m_icl: Float[torch.Tensor, "... head_index q_tokens"], m_zsl: Float[torch.Tensor, "... head_index q_tokens"],
                m_ft: Float[torch.Tensor, "... head_index q_tokens"]) -> Float[torch.Tensor, "... head_index"]:
    """cos(m_ICL - m_ZSL, m_FT - m_ZSL) per head: [..., head_index, q_tokens] -> [..., head_index]."""
    same_shape(m_icl=m_icl, m_zsl=m_zsl, m_ft=m_ft)
    return cosine(m_icl - m_zsl, m_ft - m_zsl)


# -- aggregation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NanMean:
    """A mean that ignores NaN entries and says how many there were."""

    value: torch.Tensor  # the mean over the reduced dims (NaN where every entry was NaN)
    n_nan: int           # NaN entries dropped
    n: int               # entries in total


def nan_mean(x: torch.Tensor, dim=None) -> NanMean:
    """Mean over ``dim`` (all dims if None) ignoring NaN; counts the NaN entries."""
    n_nan = int(torch.isnan(x).sum())
    value = torch.nanmean(x.double(), dim=dim) if dim is not None else torch.nanmean(x.double())
    return NanMean(value, n_nan, x.numel())


# -- Rec2FTP ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rec2FTP:
    """Recall to fine-tuning predictions (Dai et al.) with its chance baseline.

    value:  among examples FT gets right and ZSL gets wrong, the share ICL also gets right.
    chance: P(ICL right | ZSL wrong), what ``value`` would be if ICL ignored what FT does.
    NaN (not 0) when the conditioning set is empty; ``n_ft_fixed`` and ``n_zsl_wrong`` say its size.
    """

    value: float
    chance: float
    n_ft_fixed: int
    n_zsl_wrong: int

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([self.__dict__])

    def _repr_html_(self) -> str:
        return "<b>Rec2FTP</b>" + self.to_frame().to_html(index=False)


def rec2ftp(zsl_correct: Bool[torch.Tensor, " n_examples"], icl_correct: Bool[torch.Tensor, " n_examples"],
            ft_correct: Bool[torch.Tensor, " n_examples"]) -> Rec2FTP:
    """Rec2FTP from boolean correctness vectors [n_examples] of the three runs."""
    same_shape(zsl_correct=zsl_correct, icl_correct=icl_correct, ft_correct=ft_correct)
    z, i, f = zsl_correct.bool(), icl_correct.bool(), ft_correct.bool()
    fixed = f & ~z
    wrong = ~z
    n_fixed, n_wrong = int(fixed.sum()), int(wrong.sum())
    value = float((i & fixed).sum()) / n_fixed if n_fixed else math.nan
    chance = float((i & wrong).sum()) / n_wrong if n_wrong else math.nan
    return Rec2FTP(value, chance, n_fixed, n_wrong)


# -- Kendall tau ------------------------------------------------------------------------------------

def kendall_tau(x: Float[torch.Tensor, "... n"], y: Float[torch.Tensor, "... n"]) -> Float[torch.Tensor, "..."]:
    """Kendall's tau-b between x and y over the last dimension: [..., n] -> [...].

    Ties are handled as in tau-b (same as ``scipy.stats.kendalltau``). NaN when either vector is
    constant (no ranking to compare) or n < 2. Memory O(n^2) per leading element: meant for the few
    hundred demonstration tokens of a prompt.
    """
    same_shape(x=x, y=y)
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError(f"{name}: contains NaN; accepted: values without NaN (a NaN has no rank: it is "
                             "neither a tie nor an order)")
    x = x.double()
    y = y.double()
    n = x.shape[-1]
    if n < 2:
        return torch.full(x.shape[:-1], math.nan, dtype=torch.float64)
    sx = torch.sign(x[..., :, None] - x[..., None, :])
    sy = torch.sign(y[..., :, None] - y[..., None, :])
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    concord = (sx * sy)[..., upper].sum(-1)          # P - Q
    nx = (sx != 0)[..., upper].sum(-1).double()      # pairs not tied in x
    ny = (sy != 0)[..., upper].sum(-1).double()
    denom = torch.sqrt(nx * ny)
    out = concord / denom
    return torch.where(denom > 0, out, torch.full_like(out, math.nan))


# -- helpers ----------------------------------------------------------------------------------------

def same_shape(**tensors: torch.Tensor) -> None:
    """A ``ValueError`` naming every argument and its shape unless all the shapes are equal."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match; got {shapes}")


__all__ = [
    "cosine", "simaou", "same_shape", "simam", "simam_delta", "NanMean", "nan_mean",
    "Rec2FTP", "rec2ftp", "kendall_tau",
]
