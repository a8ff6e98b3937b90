"""Aligning the parameters of two models that share a vocabulary, in embedding space (Dar et al., sec. 5).

A parameter vector x of model 1 and y of model 2 are compared through their projections ``x P1``
and ``y P2`` onto the shared vocabulary (P = a model's projection matrix ``[d_model, d_vocab]``).
Their Pearson correlation across the vocabulary needs only d x d matrices: with ``Pc = P - mean
over the vocabulary``,

    corr(x, y) = x Pc1 Pc2^T y^T / sqrt(x Pc1 Pc1^T x^T * y Pc2 Pc2^T y^T),

so no vocab-sized score vector is ever formed for a pair. ``S[i, j]`` summarises the correlations
between the parameters of layer i of one model and layer j of the other; Hungarian matching
(``scipy.optimize.linear_sum_assignment``) on S proposes a layer correspondence. The same in raw
feature space (correlation across the d_model coordinates) is the baseline.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int

KINDS = ("ff_values", "ff_keys", "W_Q", "W_K", "W_V", "W_O")
STATS = ("mean_abs", "max_abs")


def gram_matrices(P1: Float[torch.Tensor, "d1 d_vocab"], P2: Float[torch.Tensor, "d2 d_vocab"]
                  ) -> tuple[Float[torch.Tensor, "d1 d1"], Float[torch.Tensor, "d2 d2"], Float[torch.Tensor, "d1 d2"]]:
    """Centred Gram matrices ``(G11 [d1, d1], G22 [d2, d2], G12 [d1, d2])`` of projections P [d, V]."""
    if P1.shape[1] != P2.shape[1]:
        raise ValueError(f"P1, P2: vocabularies differ ({P1.shape[1]} vs {P2.shape[1]} tokens); "
                         "embedding-space alignment needs a shared vocabulary")
    P1c = (P1 - P1.mean(1, keepdim=True)).double()
    P2c = (P2 - P2.mean(1, keepdim=True)).double()
    return P1c @ P1c.T, P2c @ P2c.T, P1c @ P2c.T


def _embedding_side(X: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` in float64 and the norms of its projections, ``sqrt(x G x^T)`` (G its centred Gram)."""
    X = X.double()
    return X, ((X @ G) * X).sum(-1).clamp_min(1e-300).sqrt()


def _embedding_pair(XG12: torch.Tensor, vx: torch.Tensor, Y: torch.Tensor, vy: torch.Tensor) -> torch.Tensor:
    return (XG12 @ Y.T) / vx[:, None] / vy[None, :]


def embedding_correlation(X: Float[torch.Tensor, "n d1"], Y: Float[torch.Tensor, "m d2"],
                          grams: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Float[torch.Tensor, "n m"]:
    """Correlation across the vocabulary of ``X [n, d1] P1`` and ``Y [m, d2] P2``: ``[n, m]``."""
    G11, G22, G12 = grams
    X, vx = _embedding_side(X, G11)
    Y, vy = _embedding_side(Y, G22)
    return _embedding_pair(X @ G12, vx, Y, vy)


def _feature_unit(X: torch.Tensor) -> torch.Tensor:
    """Rows of ``X`` centred over their coordinates and scaled to unit norm (float64)."""
    Xc = (X - X.mean(1, keepdim=True)).double()
    return Xc / Xc.norm(dim=1, keepdim=True).clamp_min(1e-300)


def feature_correlation(X: Float[torch.Tensor, "n d"], Y: Float[torch.Tensor, "m d"]) -> Float[torch.Tensor, "n m"]:
    """Correlation across the d coordinates of ``X [n, d]`` and ``Y [m, d]``: ``[n, m]``."""
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"X, Y: feature dimensions differ ({X.shape[1]} vs {Y.shape[1]})")
    return _feature_unit(X) @ _feature_unit(Y).T


def summarise(corr: Float[torch.Tensor, "n m"], stat: str) -> float:
    """``mean_abs``: mean |corr| over all pairs (the paper's); ``max_abs``: mean over rows of the best |corr|."""
    if stat == "mean_abs":
        return float(corr.abs().mean())
    if stat == "max_abs":
        return float(corr.abs().max(dim=1).values.mean())
    raise ValueError(f"stat: got {stat!r}; accepted: {', '.join(STATS)}")


def hungarian(S: Float[torch.Tensor, "n m"]) -> Int[torch.Tensor, " n"]:
    """Assignment maximising the total similarity: ``match[i]`` = column matched to row i."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(S.double().cpu().numpy(), maximize=True)
    out = torch.full((S.shape[0],), -1, dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return out


@dataclass
class AlignResult:
    """Layer-to-layer similarity in embedding space and in feature space, with Hungarian matchings.

    ``S_embedding``/``S_feature`` ``[n_layers_a, n_layers_b]``; ``match_embedding[i]`` = layer of
    model b matched to layer i of model a (``match_feature`` likewise; None when d_model differs).
    """

    kind: str
    stat: str
    S_embedding: torch.Tensor
    match_embedding: torch.Tensor
    S_feature: torch.Tensor | None
    match_feature: torch.Tensor | None
    basis: dict = field(default_factory=dict)

    def diagonal_recovered(self, space: str = "embedding") -> bool:
        m = self.match_embedding if space == "embedding" else self.match_feature
        return m is not None and bool((m == torch.arange(m.numel())).all())

    def to_frame(self):
        import pandas as pd

        rows = []
        for i in range(self.S_embedding.shape[0]):
            rows.append({"layer_a": i, "match_embedding": int(self.match_embedding[i]),
                         "S_embedding_diag": float(self.S_embedding[i, i]) if i < self.S_embedding.shape[1] else None,
                         "match_feature": None if self.match_feature is None else int(self.match_feature[i]),
                         "S_feature_diag": None if self.S_feature is None or i >= self.S_feature.shape[1]
                         else float(self.S_feature[i, i])})
        return pd.DataFrame(rows)

    def figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        n = 2 if self.S_feature is not None else 1
        fig = make_subplots(rows=1, cols=n, subplot_titles=["embedding space", "feature space"][:n])
        fig.add_trace(go.Heatmap(z=self.S_embedding.numpy(), coloraxis="coloraxis"), 1, 1)
        if self.S_feature is not None:
            fig.add_trace(go.Heatmap(z=self.S_feature.numpy(), coloraxis="coloraxis"), 1, 2)
        fig.update_layout(title=f"layer similarity ({self.kind}, {self.stat})", height=350)
        return fig

    def _repr_html_(self) -> str:
        return f"<b>align {html.escape(self.kind)} ({html.escape(self.stat)})</b>" + self.to_frame().to_html(index=False)


def _layer_vectors(space: Any, kind: str, layer: int) -> tuple[torch.Tensor, str]:
    """The parameter vectors of one layer, ``[n, d_model]``, and the side they live on."""
    w = space.w
    if kind == "ff_values":
        return w.W_out_layer(layer), "write"
    if kind == "ff_keys":
        return w.W_in_layer(layer).T, "read"
    if kind in ("W_Q", "W_K", "W_V"):
        M = getattr(w, f"{kind}_layer")(layer)  # [H, d_model, d_head]
        return M.permute(0, 2, 1).reshape(-1, w.d_model), "read"
    if kind == "W_O":
        return w.W_O_layer(layer).reshape(-1, w.d_model), "write"
    raise ValueError(f"kind: got {kind!r}; accepted: {', '.join(KINDS)}")


def check_shared_vocabulary(space_a: Any, space_b: Any) -> None:
    """Raise unless the two spaces have the same vocabulary (size, and tokens when both have tokenizers)."""
    if space_a.d_vocab != space_b.d_vocab:
        raise ValueError(f"models: vocabularies differ ({space_a.d_vocab} vs {space_b.d_vocab} tokens); "
                         "accepted: two models that share one vocabulary")
    ta, tb = space_a.tokenizer, space_b.tokenizer
    if ta is not None and tb is not None and ta is not tb and hasattr(ta, "get_vocab"):
        if ta.get_vocab() != tb.get_vocab():
            raise ValueError("models: the tokenizers map tokens to different ids; accepted: a shared vocabulary")


def align(space_a: Any, space_b: Any, kind: str = "ff_values", stat: str = "mean_abs",
          max_vectors: int | None = None) -> AlignResult:
    """Layer-to-layer similarity of two models' parameters in embedding space vs feature space.

    ``space_a``/``space_b``: ``EmbeddingSpace`` objects of the two models (their write basis is the
    projection of written vectors, the transpose of their read basis that of read vectors).
    ``max_vectors`` keeps the first n vectors of each layer (speed on big models).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: got {kind!r}; accepted: {', '.join(KINDS)}")
    if stat not in STATS:
        raise ValueError(f"stat: got {stat!r}; accepted: {', '.join(STATS)}")
    check_shared_vocabulary(space_a, space_b)
    _, side = _layer_vectors(space_a, kind, 0)
    Pa = space_a.W if side == "write" else space_a.R.T
    Pb = space_b.W if side == "write" else space_b.R.T
    grams = gram_matrices(Pa, Pb)
    La, Lb = space_a.n_layers, space_b.n_layers
    same_d = space_a.w.d_model == space_b.w.d_model
    S_e = torch.zeros(La, Lb, dtype=torch.float64)
    S_f = torch.zeros(La, Lb, dtype=torch.float64) if same_d else None
    va = [_layer_vectors(space_a, kind, i)[0][:max_vectors] for i in range(La)]
    vb = [_layer_vectors(space_b, kind, j)[0][:max_vectors] for j in range(Lb)]
    # the per-layer parts (Gram products, norms, centring) once per layer; one product per pair
    G11, G22, G12 = grams
    ea = [(X @ G12, vx) for X, vx in (_embedding_side(X, G11) for X in va)]
    eb = [_embedding_side(Y, G22) for Y in vb]
    fa = [_feature_unit(X) for X in va] if S_f is not None else None
    fb = [_feature_unit(Y) for Y in vb] if S_f is not None else None
    for i in range(La):
        for j in range(Lb):
            S_e[i, j] = summarise(_embedding_pair(*ea[i], *eb[j]), stat)
            if S_f is not None:
                S_f[i, j] = summarise(fa[i] @ fb[j].T, stat)
    return AlignResult(kind, stat, S_e, hungarian(S_e), S_f, hungarian(S_f) if S_f is not None else None,
                       {"a": space_a.basis, "b": space_b.basis})
