"""The paper's evaluations (Dar et al., sec. 4), each against its baseline.

* ``hidden_state_overlap``: for each token position and layer, the top-``n_neurons`` feed-forward
  neurons by activation; the union of their top-``k`` value tokens is compared with the top-``k``
  tokens of the layer's hidden state read through the write basis (logit lens without the final
  norm). Score = |union & hidden top-k| / k. Baseline: the same with the neurons of another,
  randomly chosen position.
* ``related_pairs``: overlap of the top-``k`` tokens of two parameter vectors that work together:
  the key and value of a neuron, a W_V column and the matching W_O row, a W_Q column and the
  matching W_K column; baseline: the same pairs with the partner shuffled within the layer.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int

from tl_embedspace.projections import read_scores, write_scores
from tl_plugins.ranking import top_k


@dataclass
class EvalResult:
    """Rows ``(evaluation, layer, score, baseline, n)``; ``summary()`` averages over layers."""

    name: str
    rows: list[dict] = field(default_factory=list)
    basis: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["evaluation", "layer", "score", "baseline", "n"])

    def summary(self):
        df = self.to_frame()
        out = df.groupby("evaluation", sort=False).apply(
            lambda g: __import__("pandas").Series({
                "score": (g.score * g.n).sum() / g.n.sum(), "baseline": (g.baseline * g.n).sum() / g.n.sum(),
                "n": g.n.sum()}), include_groups=False).reset_index()
        out["ratio"] = out.score / out.baseline.where(out.baseline > 0)
        return out

    def _repr_html_(self) -> str:
        return f"<b>{html.escape(self.name)}</b>" + self.summary().to_html(index=False)


def _topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    return top_k(scores, min(k, scores.shape[-1]), dim=-1)[1]


def _set_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """|a_i & b_i| / k for rows of token-id sets ``a [n, ka]``, ``b [n, kb]``."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double() / k


def _batched_topk(vectors: torch.Tensor, proj, k: int, batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, vectors.shape[0], batch):
        out.append(_topk_ids(proj(vectors[s:s + batch]), k))
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def hidden_state_overlap(space: Any, tokens: Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, " pos"], *,
                         layers: Sequence[int] | None = None,
                         n_neurons: int = 5, k: int = 50, seed: int = 0) -> EvalResult:
    """Overlap of the top neurons' value tokens with the hidden state's top tokens, per layer.

    ``tokens [batch, pos]`` (or ``[pos]``); runs the model once with observation hooks.
    """
    model = space.model
    if space.w.d_mlp is None:
        raise ValueError("model: attention-only models have no feed-forward neurons to evaluate")
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    layers = list(range(space.n_layers)) if layers is None else [space.check_layer(l) for l in layers]
    backend = space.w.backend
    post = {l: backend.hook_name("mlp_post", l) for l in layers}
    resid = {l: backend.hook_name("resid_post", l) for l in layers}
    names = set(post.values()) | set(resid.values())
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    g = torch.Generator().manual_seed(seed)
    res = EvalResult("overlap of neuron value tokens with hidden-state tokens", basis=dict(space.basis))
    for l in layers:
        act = cache[post[l]].reshape(-1, space.w.d_mlp)  # [N, d_mlp]
        hid = cache[resid[l]].reshape(-1, space.w.d_model)
        N = act.shape[0]
        top_neurons = top_k(act, n_neurons, dim=-1)[1]  # [N, n_neurons]
        needed = torch.unique(top_neurons)
        values = space.w.W_out_layer(l)[needed]
        val_top = _batched_topk(values, lambda v: write_scores(v, space.W), k)  # [n_needed, k]
        lookup = torch.full((space.w.d_mlp,), -1, dtype=torch.long)
        lookup[needed] = torch.arange(needed.numel())
        union = val_top[lookup[top_neurons]].reshape(N, -1)  # [N, n_neurons * k]
        hid_top = _batched_topk(hid, lambda v: write_scores(v, space.W), k)  # [N, k]
        score = _set_overlap(hid_top, union, k)
        perm = (torch.arange(N) + torch.randint(1, max(2, N), (N,), generator=g)) % N  # another position
        base = _set_overlap(hid_top, union[perm], k)
        res.rows.append({"evaluation": f"hidden-state overlap (top-{n_neurons} neurons, top-{k})", "layer": l,
                         "score": float(score.mean()), "baseline": float(base.mean()), "n": N})
    return res


def related_pairs(space: Any, *, k: int = 100, layers: Sequence[int] | None = None,
                  max_vectors: int | None = 256, seed: int = 0,
                  which: Sequence[str] = ("K/V neuron", "W_V/W_O", "W_Q/W_K")) -> EvalResult:
    """Top-k token overlap of related parameter pairs vs the same pairs with shuffled partners.

    ``max_vectors`` samples that many pairs per layer and kind (None: all of them).
    """
    layers = list(range(space.n_layers)) if layers is None else [space.check_layer(l) for l in layers]
    g = torch.Generator().manual_seed(seed)
    w = space.w
    write = lambda v: write_scores(v, space.W)
    read = lambda v: read_scores(v, space.R)
    res = EvalResult(f"related-pair agreement (top-{k} tokens)", basis=dict(space.basis))
    for l in layers:
        pairs = {}
        if "K/V neuron" in which and w.d_mlp is not None:
            pairs["K/V neuron"] = (w.W_in_layer(l).T, read, w.W_out_layer(l), write)
        if "W_V/W_O" in which:
            pairs["W_V/W_O"] = (w.W_V_layer(l).permute(0, 2, 1).reshape(-1, w.d_model), read,
                                w.W_O_layer(l).reshape(-1, w.d_model), write)
        if "W_Q/W_K" in which:
            pairs["W_Q/W_K"] = (w.W_Q_layer(l).permute(0, 2, 1).reshape(-1, w.d_model), read,
                                w.W_K_layer(l).permute(0, 2, 1).reshape(-1, w.d_model), read)
        for name, (X, px, Y, py) in pairs.items():
            n = X.shape[0]
            idx = torch.randperm(n, generator=g)[:max_vectors] if max_vectors else torch.arange(n)
            shuffled = idx[torch.randperm(idx.numel(), generator=g)]
            if idx.numel() > 1:  # a derangement, so no pair is compared with itself
                same = shuffled == idx
                shuffled = torch.where(same, idx.roll(1), shuffled)
            tx = _batched_topk(X[idx], px, k)
            ty = _batched_topk(Y[idx], py, k)
            pos = {int(i): r for r, i in enumerate(idx.tolist())}
            ty_shuf = ty[torch.tensor([pos[int(i)] for i in shuffled])]
            res.rows.append({"evaluation": name, "layer": l, "score": float(_set_overlap(tx, ty, k).mean()),
                             "baseline": float(_set_overlap(tx, ty_shuf, k).mean()), "n": int(idx.numel())})
    return res
